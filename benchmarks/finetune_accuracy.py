"""Downstream accuracy: short masked-LM pre-training, then SST-2 and AG News fine-tuning, for each model.

Each contender has the same shape and is trained the same way; only the attention differs:
  - longformer_style: sliding window 128 (64 tokens each side) at 512-token pre-training sequences;
  - linformer_encoder: keys and values projected to k = 128;
  - reformer_lm (bidirectional, masked LM): local and LSH layers alternating, chunk 64, 2 hash rounds;
  - full attention: the Longformer-style model with a window that covers the whole sequence, which the package
    computes as plain softmax attention (SDPA): the same parameters and code, every pair allowed.

Steps (the commands of the package, run as subprocesses; contenders run side by side on one GPU):
  1. an MLM corpus in WikiText layout from the data folder: WikiText-2 valid+test, the SST-2 training sentences and
     the AG News held-out-of-train texts (never a test split), and one byte-level BPE tokenizer trained on it;
  2. `subquadratic-train` (masked LM) for each contender, for the same number of steps;
  3. `subquadratic-finetune` from each checkpoint on SST-2 (train -> test, the GLUE validation set) and AG News
     (the 10,000 held-out training rows -> the official test set);
  4. one table of test accuracy (and macro F1), written to OUT/results.json.

    python benchmarks/finetune_accuracy.py --data ../shared/data --out runs/finetune      # GPU, a few minutes
    python benchmarks/finetune_accuracy.py --data ../shared/data --out /tmp/ft --quick     # CPU smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, pad_token_id=1)
SEQ_LEN = 512
CONTENDERS = {
    "longformer_style": ("longformer_style", dict(SHAPE, attention_window=128, max_position_embeddings=SEQ_LEN + 2)),
    "linformer_encoder": ("linformer_encoder", dict(SHAPE, projected_length=128, max_position_embeddings=SEQ_LEN)),
    "reformer_lm": ("reformer_lm", dict(SHAPE, attention_head_size=64, lsh_chunk_length=64, local_chunk_length=64,
                                        num_hashes=2, max_position_embeddings=SEQ_LEN, axial_pos_shape=[16, 32],
                                        axial_pos_embds_dim=[64, 192])),
    "full_attention": ("longformer_style", dict(SHAPE, attention_window=2 * SEQ_LEN,
                                                max_position_embeddings=SEQ_LEN + 2)),
}
TASKS = {
    "sst2": dict(train="sst2/train.tsv", validation="sst2/dev.tsv", test="sst2/test.tsv", extra=[]),
    "agnews": dict(train="agnews/dev.tsv", validation=None, test="agnews/test.tsv",
                   extra=["--no_header", "--column_names", "text,label"]),
}


def read_texts(path: str, column: int, header: bool) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row[column].strip() for row in rows[1 if header else 0:] if row and row[column].strip()]


def build_corpus(data: str, out: str, vocab_size: int) -> str:
    """OUT/corpus/wiki.{train,valid,test}.tokens and OUT/tokenizer; returns the tokenizer folder."""
    from subquadratic.training.tokenizer import train_tokenizer

    folder, tok_folder = os.path.join(out, "corpus"), os.path.join(out, "tokenizer")
    if os.path.isdir(tok_folder):
        return tok_folder
    wiki = []
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        with open(os.path.join(data, "wikitext-2", name), encoding="utf-8") as f:
            wiki += [line.strip() for line in f if line.strip()]
    in_domain = read_texts(os.path.join(data, "sst2/train.tsv"), 0, True) + \
        read_texts(os.path.join(data, "agnews/dev.tsv"), 0, False)
    held = len(wiki) // 50  # 2% of the WikiText lines each for the MLM's own valid and test splits
    splits = {"valid": wiki[:held], "test": wiki[held:2 * held], "train": wiki[2 * held:] + in_domain}
    os.makedirs(folder, exist_ok=True)
    for split, lines in splits.items():
        with open(os.path.join(folder, f"wiki.{split}.tokens"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    train_tokenizer(splits["train"], "bpe", vocab_size).save_pretrained(tok_folder)
    print(f"corpus: {sum(map(len, splits['train']))/1e6:.1f}M characters of training text; tokenizer {vocab_size}")
    return tok_folder


def launch(cmd: list[str], log: str) -> subprocess.Popen:
    print("$", " ".join(cmd[2:]), flush=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, str]) -> None:
    failed = []
    for name, proc in procs.items():
        if proc.wait() != 0:
            failed.append(name)
            print(f"--- {name} failed; last lines of {logs[name]}:\n" + "".join(open(logs[name]).readlines()[-15:]))
    if failed:
        raise SystemExit(f"failed: {failed}")


def pretrain(args, tokenizer: str) -> dict[str, float]:
    procs, logs, started = {}, {}, time.time()
    for name, (model_type, fields) in CONTENDERS.items():
        folder = os.path.join(args.out, "pretrain", name)
        if os.path.isdir(os.path.join(folder, "model")):
            continue
        logs[name] = os.path.join(args.out, f"pretrain-{name}.log")
        cmd = [sys.executable, "-m", "subquadratic.training.cli", "--model_type", model_type,
               "--model", json.dumps(fields), "--dataset", "wikitext-2", "--data_path",
               os.path.join(args.out, "corpus"), "--tokenizer", tokenizer, "--task", "masked_lm",
               "--seq_len", str(SEQ_LEN), "--batch_size", str(args.pretrain_batch), "--learning_rate", "5e-4",
               "--warmup_steps", str(max(1, args.pretrain_steps // 20)), "--max_steps", str(args.pretrain_steps),
               "--mixed_precision", args.precision, "--log_every", "50", "--eval_every", "0",
               "--eval_tokens", "65536", "--save_every", "0", "--trackers", "[]", "--resume", "false",
               "--sample_prompt", "null", "--gradient_accumulation_steps", "1", "--output_dir", folder]
        if args.pretrain_minutes:
            cmd += ["--max_minutes", str(args.pretrain_minutes)]
        procs[name] = launch(cmd, logs[name])
    wait_all(procs, logs)
    print(f"pre-training done in {(time.time() - started) / 60:.1f} min", flush=True)
    summary = {}
    for name in CONTENDERS:
        rows = [json.loads(line) for line in open(os.path.join(args.out, "pretrain", name, "metrics.jsonl"))]
        final = next((r for r in reversed(rows) if any(k.startswith("valid/") for k in r)), {})
        summary[name] = {k: v for k, v in final.items() if k.startswith(("valid/", "test/"))}
    return summary


def finetune(args) -> dict:
    procs, logs = {}, {}
    for name in CONTENDERS:
        for task, spec in TASKS.items():
            folder = os.path.join(args.out, "finetune", f"{name}-{task}")
            if os.path.isfile(os.path.join(folder, "model", "all_results.json")):
                continue
            logs[(name, task)] = os.path.join(args.out, f"finetune-{name}-{task}.log")
            cmd = [sys.executable, "-m", "subquadratic.training.finetune_cli",
                   "--model", os.path.join(args.out, "pretrain", name, "model"),
                   "--train_file", os.path.join(args.data, spec["train"]),
                   "--test_file", os.path.join(args.data, spec["test"]), *spec["extra"],
                   "--dataset_id", task, "--max_length", "128", "--output_dir", folder,
                   "--num_train_epochs", str(args.epochs), "--learning_rate", "1e-4", "--warmup_steps", "50",
                   "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256",
                   "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "50", "--seed", "0",
                   "--report_to", "none", *(["--bf16"] if args.precision == "bf16" else [])]
            if spec["validation"]:
                cmd[cmd.index("--test_file"):cmd.index("--test_file")] = [
                    "--validation_file", os.path.join(args.data, spec["validation"])]
            if args.max_train_samples:
                cmd += ["--max_train_samples", str(args.max_train_samples)]
            if args.max_eval_samples:
                cmd += ["--max_eval_samples", str(args.max_eval_samples)]
            procs[(name, task)] = launch(cmd, logs[(name, task)])
    wait_all(procs, logs)
    results = {}
    for name in CONTENDERS:
        for task in TASKS:
            with open(os.path.join(args.out, "finetune", f"{name}-{task}", "model", "all_results.json")) as f:
                results[f"{name}/{task}"] = json.load(f)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="folder with sst2/, agnews/ and wikitext-2/")
    p.add_argument("--out", default="runs/finetune_accuracy")
    p.add_argument("--pretrain_steps", type=int, default=2000)
    p.add_argument("--pretrain_minutes", type=float, default=None, help="also stop pre-training after this long")
    p.add_argument("--pretrain_batch", type=int, default=32)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--precision", choices=["bf16", "no"], default=None, help="default: bf16 on a GPU")
    p.add_argument("--quick", action="store_true", help="a few steps and samples (CPU smoke test)")
    args = p.parse_args()
    import torch

    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "no"
    if args.quick:
        args.pretrain_steps, args.pretrain_batch, args.epochs = 4, 2, 1.0
        args.max_train_samples, args.max_eval_samples, args.vocab_size = 64, 64, 600
    for path in ("sst2/train.tsv", "sst2/test.tsv", "agnews/dev.tsv", "agnews/test.tsv", "wikitext-2"):
        if not os.path.exists(os.path.join(args.data, path)):
            raise SystemExit(f"--data {args.data}: {path} is missing (expected the layout of ../shared/data)")
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    tokenizer = build_corpus(args.data, args.out, args.vocab_size)
    mlm = pretrain(args, tokenizer)
    results = finetune(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "args": vars(args), "pretrain": mlm,
                   "finetune": results, "minutes": (time.time() - started) / 60}, f, indent=1)
    print(f"\n{'model':<20} {'MLM valid acc':>13} {'SST-2 acc':>10} {'AG News acc':>12} {'AG News F1':>11}")
    for name in CONTENDERS:
        sst, ag = results[f"{name}/sst2"], results[f"{name}/agnews"]
        mlm_acc = mlm[name].get("valid/accuracy", float("nan"))
        print(f"{name:<20} {mlm_acc:>13.4f} {sst.get('test_accuracy', float('nan')):>10.4f} "
              f"{ag.get('test_accuracy', float('nan')):>12.4f} {ag.get('test_macro_f1', float('nan')):>11.4f}")
    print(f"majority class: SST-2 {results['full_attention/sst2'].get('test_majority_accuracy', float('nan')):.4f}, "
          f"AG News {results['full_attention/agnews'].get('test_majority_accuracy', float('nan')):.4f}; "
          f"{(time.time() - started) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
