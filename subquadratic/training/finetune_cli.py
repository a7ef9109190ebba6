"""`subquadratic-finetune`: fine-tune a model of the package for sequence or token classification with
`transformers.Trainer` (see `subquadratic.training.finetune` for the recipe and the long-document option).

    subquadratic-finetune --dataset_name glue/sst2 --model runs/reformer/model --output_dir runs/sst2
    subquadratic-finetune --train_file train.tsv --validation_file dev.tsv --model_type linformer_encoder \\
        --model_config '{"hidden_size": 128, "max_position_embeddings": 512}' --num_train_epochs 3
    subquadratic-finetune --train_file agnews/dev.tsv --test_file agnews/test.tsv --no_header \\
        --column_names text,label --pack_documents 4096 --model_type longformer_style --model_config '{...}'
    subquadratic-finetune --task token_classification --train_file ner/train.jsonl --model_type linformer_encoder
    subquadratic-finetune ... --push_to_hub user/my-model
"""

from __future__ import annotations

import argparse
import sys

PROG = "subquadratic-finetune"
TRAINING_DEFAULTS = {"output_dir": "outputs/finetune", "report_to": "none"}


def parse_args(argv: list[str]):
    """(FinetuneConfig, TrainingArguments) from the command line: this command's own flags first, every other
    flag goes to `transformers.TrainingArguments` unchanged."""
    from transformers import HfArgumentParser, TrainingArguments

    from .finetune import FinetuneConfig

    ours = HfArgumentParser(FinetuneConfig, prog=PROG, description=__doc__.split("\n\n")[0],
                            epilog="Every flag of transformers.TrainingArguments is accepted too (--output_dir, "
                                   "--learning_rate, --num_train_epochs, --per_device_train_batch_size, "
                                   "--eval_strategy, --bf16, --seed, ...): see `--help-training`.",
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    training = HfArgumentParser(TrainingArguments, prog=f"{PROG} (TrainingArguments)", allow_abbrev=False)
    import torch

    # pinned memory only helps copies to a GPU (and warns on every run without one)
    training.set_defaults(**TRAINING_DEFAULTS, dataloader_pin_memory=torch.cuda.is_available())
    if "--help-training" in argv:
        training.print_help()
        raise SystemExit(0)
    cfg, rest = ours.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    try:
        (args,) = training.parse_args_into_dataclasses(rest)
    except SystemExit as e:  # argparse has printed what is wrong
        raise SystemExit(2) from e
    return cfg, args


def run(argv: list[str]) -> dict:
    """The command on ``argv``; returns the metrics (and `model_folder`, `hub_url`). Exits with status 2 and a
    one-line message on bad input (before training), 1 when only the push failed."""
    from .hub import HubError

    try:
        cfg, args = parse_args(argv)
        from .finetune import Finetuning

        run = Finetuning(cfg, args)  # data, tokenizer, model, hub token: every bad input fails here
    except (ValueError, FileNotFoundError, HubError) as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        raise SystemExit(2) from None
    try:
        results = run.run()
    except HubError as e:  # training is done and the folder saved: say so, and how to push it again
        sys.stderr.write(f"{PROG}: error: {e}\n")
        raise SystemExit(1) from None
    print(f"saved {results['model_folder']}" + (f"; pushed to {results['hub_url']}" if "hub_url" in results else ""))
    return results


def main(argv: list[str] | None = None) -> None:
    run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
