"""Time of the LSH hash on a GPU: the readable path of `hash_vectors` (fp32 products, then max and min over the
rotated vectors) against the fused Triton kernel (`hash_kernel`), and the kernel's tile configurations.

Shape: batch 1, 8 heads of 64 in bf16 (as under autocast, heads split off a (T, 512) projection), 4 rounds,
num_buckets = 2T/64 (the benchmark's rule); mean of 5 calls after 2, CUDA synchronised. Also prints the share of
buckets on which the two paths agree.

    python benchmarks/lsh_hash_speed.py --lengths 16384 65536

Needs CUDA and Triton (prints a message and exits 0 without them).
"""

from __future__ import annotations

import argparse
import sys
import time

CONFIGS = [(128, 64, 4), (128, 64, 8), (256, 64, 8), (128, 128, 8), (64, 64, 4), (64, 128, 4)]


def timed(fn, *args, repeats: int = 5):
    import torch

    for _ in range(2):
        out = fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    args = parser.parse_args(argv)
    import torch

    import subquadratic.modeling.attention.hash_kernel as kernel
    from subquadratic.modeling.attention.flex import fast_paths
    from subquadratic.modeling.attention.lsh import hash_vectors
    from subquadratic.modeling.attention.masking import split_heads

    if not torch.cuda.is_available() or kernel.triton is None:
        print("lsh_hash_speed: needs CUDA and Triton, nothing to measure (exit 0).")
        return 0
    shipped = kernel.BLOCK_M, kernel.BLOCK_N, kernel.NUM_WARPS
    for length in args.lengths:
        buckets = 2 * length // 64
        vectors = split_heads(torch.randn(1, length, 512, device="cuda", dtype=torch.bfloat16), 8)
        rotations = torch.randn(4, 64, buckets // 2, device="cuda")
        with fast_paths(False):
            readable_ms, expected = timed(hash_vectors, vectors, rotations, buckets)
        print(f"T={length}, {buckets} buckets: readable path {readable_ms:.2f} ms")
        for config in CONFIGS:
            kernel.BLOCK_M, kernel.BLOCK_N, kernel.NUM_WARPS = config
            ms, got = timed(kernel.launch_buckets, vectors, rotations, buckets)
            same = (got == expected).float().mean().item()
            mark = " (shipped)" if config == shipped else ""
            print(f"  kernel {config[0]} x {config[1]} tiles, {config[2]} warps{mark}: {ms:.2f} ms, "
                  f"same buckets {same:.6f}")
        kernel.BLOCK_M, kernel.BLOCK_N, kernel.NUM_WARPS = shipped
    return 0


if __name__ == "__main__":
    sys.exit(main())
