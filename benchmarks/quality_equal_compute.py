"""Quality at equal compute: is a Reformer (or a Longformer-style model) as good as a plain Transformer?

Trains each contender with `subquadratic-train` for the same wall-clock budget on the same byte-level text, then
reports held-out bits per character side by side and plots the training curves against time.

Contenders share one shape (6 layers, hidden 512, 8 heads of 64, feed-forward 2048, 4,096-byte sequences, batch 4,
bf16 on a GPU): Reformer-LM (local/LSH alternating, chunk 64, 2 hash rounds), the Longformer-style model in causal
mode (window 512), and GPT-2 from `transformers` (full attention through SDPA). Linformer is left out: it is
bidirectional and has no causal LM.

    python benchmarks/quality_equal_compute.py --data_path bytes.txt --minutes 2 --out runs/quality
    python benchmarks/quality_equal_compute.py --plot-only --out runs/quality      # redraw from metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPE = dict(layers=6, hidden=512, heads=8, head=64, ff=2048)
CONTENDERS = {
    "reformer_lm": ["--model_type", "reformer_lm", "--model",
                    json.dumps(dict(hidden_size=512, num_attention_heads=8, attention_head_size=64, num_hidden_layers=6,
                                    intermediate_size=2048, lsh_chunk_length=64, local_chunk_length=64, num_hashes=2,
                                    max_position_embeddings=4096, axial_pos_shape=[64, 64],
                                    axial_pos_embds_dim=[128, 384], hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0))],
    "longformer_style": ["--model_type", "longformer_style", "--model",
                         json.dumps(dict(hidden_size=512, num_attention_heads=8, num_hidden_layers=6,
                                         intermediate_size=2048, attention_window=512, max_position_embeddings=4098,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))],
    "gpt2 (full attention)": ["--model_type", "gpt2", "--model",
                              json.dumps(dict(n_embd=512, n_head=8, n_layer=6, n_inner=2048, n_positions=4096,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))],
}


def run(name: str, args, out: str) -> None:
    folder = os.path.join(out, name.split()[0])
    cmd = [sys.executable, "-m", "subquadratic.training.cli", *CONTENDERS[name], "--dataset", "text",
           "--data_path", args.data_path, "--task", "causal_lm", "--seq_len", "4096", "--batch_size", "4",
           "--learning_rate", "5e-4", "--warmup_steps", "50", "--max_steps", str(args.max_steps),
           "--max_minutes", str(args.minutes), "--mixed_precision", args.precision, "--log_every", "10",
           "--eval_every", "0", "--save_every", "0", "--trackers", "[]", "--sample_prompt", "null",
           "--resume", "false", "--output_dir", folder]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def read(out: str, name: str):
    rows = [json.loads(line) for line in open(os.path.join(out, name.split()[0], "metrics.jsonl"))]
    curve = [(r["step"], r["train/loss"], r["tokens_per_s"]) for r in rows if "train/loss" in r]
    final = next((r for r in reversed(rows) if "test/bpc" in r), {})
    return curve, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", help="a byte-level text file (split 90/5/5)")
    parser.add_argument("--minutes", type=float, default=2.0, help="training wall-clock budget per contender")
    parser.add_argument("--max_steps", type=int, default=2000, help="length of the learning-rate schedule")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--only", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if not args.plot_only:
        for name in args.only:
            run(name, args, args.out)
    print("| model | steps in budget | median tokens/s | valid bpc | test bpc |")
    print("|---|---:|---:|---:|---:|")
    curves = {}
    for name in args.only:
        curve, final = read(args.out, name)
        curves[name] = curve
        speeds = sorted(c[2] for c in curve[1:]) or [0]
        print(f"| {name} | {curve[-1][0] if curve else 0} | {speeds[len(speeds) // 2]:,.0f} | "
              f"{final.get('valid/bpc', float('nan')):.3f} | {final.get('test/bpc', float('nan')):.3f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens_per_window = 10 * 4 * 4096  # log_every steps x batch x seq_len
    for name, curve in curves.items():
        minutes, elapsed = [], 0.0
        for _, _, speed in curve:
            elapsed += tokens_per_window / speed / 60
            minutes.append(elapsed)
        ax.plot(minutes, [c[1] / 0.693147 for c in curve], label=name)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("training bits per byte")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "quality_equal_compute.png"), dpi=120)


if __name__ == "__main__":
    main()
