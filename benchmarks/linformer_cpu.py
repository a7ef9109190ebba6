"""Linformer vs. full attention on CPU: forward+backward time and peak memory as the sequence length n grows.

    python benchmarks/linformer_cpu.py                      # n = 512 ... 16K, about 4-5 minutes
    python benchmarks/linformer_cpu.py --lengths 512 1024   # a quick look
    python benchmarks/linformer_cpu.py --max-full-eager 16384   # full-eager at 16K too (a step takes about 4x
                                                            # its 8K time, and about 9 GiB)
    python benchmarks/linformer_cpu.py --threads 2          # on an otherwise idle machine only (see below)

Three encoders of the same size (default: 2 layers, hidden 128, 2 heads, feed-forward 512, batch 1) share
everything but the softmax:

    linformer    keys and values projected from n to k positions (k = 256, learned E, F per head): O(n k)
    full-sdpa    softmax over all n keys through `torch.nn.functional.scaled_dot_product_attention`, which on
                 CPU runs a fused (flash-style) kernel: O(n^2) time, but the n x n scores are never stored
    full-eager   softmax over all n keys with the n x n probabilities materialised (BERT's eager attention):
                 O(n^2) time and memory

Each (encoder, n) case runs in a fresh Python subprocess, so nothing (allocator caches, thread pools) carries
over between cases. It builds the model, resets the kernel's peak-RSS mark (/proc/self/clear_refs), runs one
forward+backward and reports peak RSS minus the RSS before that step (so parameters are excluded, their
gradients included); then it times up to `--repeats` more steps (within `--case-budget-s`) and reports the
fastest (the one least disturbed by other load on the machine) and the least process CPU time of a step (all
threads; close to wall time when nothing disturbed the step). The fitted growth exponent is the least-squares
slope of log(time) and log(memory) against log(n), over all lengths and over the upper half (where fixed
overheads matter least). Full attention is skipped above `--max-full-sdpa` / `--max-full-eager` (defaults 16K
/ 8K) to keep the default run within about 5 minutes; skipped cases are marked in the table.

One thread by default: on a 2-core machine shared with other work, 2-thread steps waited on descheduled
threads at every parallel region and their times (wall and CPU) swung by up to 10x; single-threaded ones were
steady."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

MODELS = ("linformer", "full-sdpa", "full-eager")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Sets VmHWM back to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(model_name: str, n: int, args):
    """A LinformerModel for n; for the full-attention encoders each layer's attention is swapped for softmax
    over all keys with the same query/key/value/output layers (the E, F projections are dropped)."""
    import torch
    from torch import nn

    from subquadratic import LinformerConfig, LinformerModel
    from subquadratic.modeling.attention.masking import merge_heads, split_heads

    class FullSelfAttention(nn.Module):
        def __init__(self, linformer_attention, fused: bool):
            super().__init__()
            self.num_heads, self.fused = linformer_attention.num_heads, fused
            self.query, self.key = linformer_attention.query, linformer_attention.key
            self.value, self.output = linformer_attention.value, linformer_attention.output

        def forward(self, hidden_states, **_):
            # (B, H, n, D) each; scores (B, H, n, n)
            q, k, v = (split_heads(proj(hidden_states), self.num_heads)
                       for proj in (self.query, self.key, self.value))
            if self.fused:
                out = nn.functional.scaled_dot_product_attention(q, k, v)
            else:
                scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
                out = scores.softmax(dim=-1) @ v
            return self.output(merge_heads(out))

    config = LinformerConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                             max_position_embeddings=n, projected_length=min(args.k, n),
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = LinformerModel(config).train()
    if model_name != "linformer":
        for layer in model.layers:
            layer.attention = FullSelfAttention(layer.attention, fused=model_name == "full-sdpa")
    return model


def worker(model_name: str, n: int, args) -> dict:
    """Runs one case (in its own subprocess)."""
    import torch

    torch.set_num_threads(args.threads)
    model = build(model_name, n, args)
    input_ids = torch.randint(1, 1000, (args.batch, n), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids).last_hidden_state.pow(2).mean().backward()

    reset_peak_rss()
    baseline = rss_kib("VmRSS")
    start = time.perf_counter()
    step()  # the measured-memory step, also the warm-up
    spent = time.perf_counter() - start
    peak = rss_kib("VmHWM") - baseline
    wall, cpu = [], []
    while len(wall) < args.repeats and (not wall or spent < args.case_budget_s):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        spent += wall[-1]
    return {"time_s": min(wall), "cpu_s": min(cpu), "peak_mib": peak / 1024, "steps": len(wall)}


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(y) against log(n)."""
    points = [(math.log(n), math.log(y)) for n, y in points if y > 0]
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def run_case(model_name: str, n: int, args) -> dict | str:
    limit = {"full-sdpa": args.max_full_sdpa, "full-eager": args.max_full_eager}.get(model_name)
    if limit is not None and n > limit:
        return "skipped"
    cmd = [sys.executable, __file__, "--worker", model_name, str(n), *sys.argv[1:]]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    if result.returncode != 0:
        return "failed" if result.returncode > 0 else "killed (OOM?)"
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: dict, args) -> None:
    names = [m for m in MODELS if m in args.models]
    columns = (("time_s", "wall s", ".3f"), ("cpu_s", "cpu s", ".2f"), ("peak_mib", "MiB", ".1f"))
    width = 9 * len(columns) - 1
    print(f"{'':>6} | " + " | ".join(f"{m:^{width}}" for m in names))
    header = f"{'n':>6} | " + " | ".join(" ".join(f"{label:>8}" for _, label, _ in columns) for _ in names)
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        cells = []
        for m in names:
            r = results[m, n]
            cells.append(" ".join(f"{r[key]:>8{fmt}}" for key, _, fmt in columns) if isinstance(r, dict)
                         else f"{r:>{width}}")
        print(f"{n:>6} | " + " | ".join(cells))
    print("wall s: fastest forward+backward step; cpu s: least process CPU time of a step (all threads; less"
          " disturbed by other load); MiB: peak RSS growth during one step.")
    print("skipped: n above --max-full-sdpa / --max-full-eager, left out to keep the run short.")
    print()
    print("fitted growth exponent (slope of log y vs log n): all lengths / upper half of the lengths")
    for m in names:
        measured = [(n, results[m, n]) for n in args.lengths if isinstance(results[m, n], dict)]
        upper = measured[len(measured) // 2:] if len(measured) >= 4 else measured
        fits = []
        for key, _, _ in columns:
            both = [slope([(n, r[key]) for n, r in part]) for part in (measured, upper)]
            fits.append(" / ".join("n/a" if s is None else f"{s:.2f}" for s in both))
        span = f"n = {measured[0][0]}..{measured[-1][0]}" if measured else "no data"
        print(f"  {m:<10} wall {fits[0]:<12} cpu {fits[1]:<12} memory {fits[2]:<12} ({span})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--k", type=int, default=256, help="Linformer's projected length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after the warm-up (fastest kept)")
    parser.add_argument("--case-budget-s", type=float, default=15.0, help="stop repeating a case after this")
    parser.add_argument("--case-timeout-s", type=float, default=300.0)
    parser.add_argument("--max-full-sdpa", type=int, default=16384, help="skip full-sdpa above this n")
    parser.add_argument("--max-full-eager", type=int, default=8192, help="skip full-eager above this n")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return

    import torch
    import transformers

    print(f"command: python {' '.join(sys.argv)}\n"
          f"torch {torch.__version__}, transformers {transformers.__version__}, {cpu_model()}, "
          f"{args.threads} threads; {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
          f"k = {args.k}, batch {args.batch}; one step = forward + backward\n")
    results = {}
    for n in args.lengths:
        for m in args.models:
            results[m, n] = run_case(m, n, args)
            print(f"  done: {m:<10} n={n:<6} {results[m, n]}", file=sys.stderr, flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
