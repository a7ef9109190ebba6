"""Peak memory and time of LSH hashing: the package's `hash_vectors` against the formula as written in the paper
(all rounds at once, argmax over [x, -x]), which is what dominated the Reformer's peak memory at long lengths.

Shape: batch 1, 8 heads of 64, 4 rounds, num_buckets = 2T/64 (the benchmark's rule, so the rotated vectors grow as
T^2/64), fp32 input that requires grad, on CPU. Each case runs in a fresh process; memory is peak RSS growth.

    python benchmarks/lsh_hash_memory.py --lengths 16384 32768 65536
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def case(kind: str, length: int) -> dict:
    import torch

    from subquadratic.modeling.attention.lsh import hash_vectors

    buckets = 2 * length // 64
    vectors = torch.randn(1, 8, length, 64, requires_grad=True)
    rotations = torch.randn(4, 64, buckets // 2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "paper":
        rotated = torch.einsum("bhtd,rdk->bhrtk", vectors, rotations)
        torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    else:
        hash_vectors(vectors, rotations, buckets)
    seconds = time.perf_counter() - start
    return dict(kind=kind, length=length, seconds=seconds,
                peak_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case[0], int(args.case[1]))))
        return
    print(f"{'T':>7} | {'buckets':>7} | {'paper MiB':>10} {'s':>6} | {'package MiB':>11} {'s':>6}")
    for length in args.lengths:
        cells = []
        for kind in ("paper", "package"):
            out = subprocess.run([sys.executable, __file__, "--case", kind, str(length)], capture_output=True, text=True)
            if out.returncode:
                cells.append(f"{'killed (OOM?)':>17}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append(f"{row['peak_mib']:>{10 if kind == 'paper' else 11}.0f} {row['seconds']:>6.2f}")
        print(f"{length:>7} | {2 * length // 64:>7} | {cells[0]} | {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
