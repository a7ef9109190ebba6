"""`subquadratic-train`: train a model of the package from a preset or a config file.

    subquadratic-train reformer-enwik8-tiny                          # the built-in default: a minute on a CPU
    subquadratic-train reformer-enwik8 --data_path enwik8.zip --output_dir runs/enwik8
    accelerate launch --num_processes 8 -m subquadratic.training.cli reformer-enwik8 --data_path enwik8
    subquadratic-train my_run.yaml --max_steps 500 --model.num_hashes 8 --mixed_precision bf16
    subquadratic-train --list-presets
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import TrainConfig, load_config, preset_names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="subquadratic-train", description=__doc__.split("\n\n")[0],
                                     epilog="Any field of the training config can be overridden with --name value; "
                                            "model config fields with --model.name value. Fields:\n"
                                            + TrainConfig.__doc__.split("Attributes:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="reformer-enwik8-tiny",
                        help="a preset name or a YAML/JSON file, first if given (default: reformer-enwik8-tiny)")
    parser.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the first argument can be the config: the values of --key overrides must not be taken for it.
    source = argv.pop(0) if argv and not argv[0].startswith("-") else parser.get_default("config")
    args, overrides = parser.parse_known_args(["--list-presets"] if "--list-presets" in argv else
                                              [a for a in argv if a in ("-h", "--help")])
    if args.list_presets:
        print("\n".join(preset_names()))
        return
    try:
        cfg = load_config(source, overrides + [a for a in argv if a not in ("-h", "--help")])
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"subquadratic-train: error: {e}\n")
    from .hub import HubError
    from .loop import Run  # heavy imports only once the config is known to be good

    try:
        run = Run(cfg)  # data, model, batch and hub checks: every bad input fails here, before training
    except (ValueError, FileNotFoundError, HubError) as e:
        sys.stderr.write(f"subquadratic-train: error: {e}\n")
        raise SystemExit(2) from None
    try:
        run.run()
    except HubError as e:  # trained and saved; only the upload failed
        sys.stderr.write(f"subquadratic-train: error: {e}\n")
        raise SystemExit(1) from None
    if run.accelerator.is_main_process and cfg.task == "causal_lm" and cfg.sample_prompt:
        print(sample(os.path.join(cfg.output_dir, "model"), cfg.sample_prompt))


def sample(folder: str, prompt: str, max_new_tokens: int = 120) -> str:
    """Reloads a saved folder through the Auto classes, as a user would, and continues ``prompt``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None:  # the model refuses longer sequences
        max_new_tokens = max(0, min(max_new_tokens, limit - ids.shape[1]))
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=10,
                         pad_token_id=tokenizer.pad_token_id)
    return f"sample from {folder} (reloaded with AutoModelForCausalLM):\n{tokenizer.decode(out[0])}"


if __name__ == "__main__":
    main()
