"""LSH bucket ids in one Triton kernel: the random rotation and the argmax over [xR; -xR] fused, on CUDA.

`lsh.hash_vectors` computes the rotated vectors x R of every position and round (B, H, T, R, num_buckets / 2) and
then their max and min. With the paper's rule of num_buckets growing with the length, that tensor grows as T^2:
at 64K tokens (2,048 buckets, 4 rounds, 8 heads) it is 8.6 GB per layer, written once and read twice, in fp32
products that run without tensor cores; on an H200 the hash took 41 of the 143 ms of a Reformer-LM training step.
This kernel keeps each tile of rotated vectors in registers: it multiplies a block of positions by a block of
rotation columns on the tensor cores in TF32, folds the tile into a running max and min with their columns, and
writes only the bucket ids.

Both paths hash the same numbers: the vectors and rotations rounded to TF32 (10-bit mantissa, `round_to_tf32`;
queries in bf16 are TF32 already). Products of TF32 numbers are exact in fp32, so the kernel and the readable
fp32 product differ only in the order of their fp32 sums, as any two fp32 matrix products do; the buckets agree
but for ties within that rounding. Each position's products are computed alike wherever it sits in the
sequence, so the full forward pass and cached decoding agree too.

The kernel is registered as the custom op ``subquadratic::lsh_buckets`` so that `torch.compile` treats it as one
opaque call (its shape function gives the output's shape without running it).
"""

from __future__ import annotations

import torch

from .triton_support import launch_device, triton

if triton is not None:
    import triton.language as tl


def bucket_sizes(num_buckets: int | list[int]) -> list[int]:
    """num_buckets as the list of its factors: an int n is [n]; factorised buckets [b1, b2] stay as they are."""
    return list(num_buckets) if isinstance(num_buckets, (list, tuple)) else [num_buckets]


def kernel_available(vectors: torch.Tensor) -> bool:
    """Whether the fused hash can run on ``vectors`` (CUDA tensors with Triton installed)."""
    return triton is not None and vectors.is_cuda


if triton is not None:

    @triton.jit
    def _buckets_kernel(x_ptr, rot_ptr, out_ptr, heads, length, rounds, stride_b, stride_h, stride_t, stride_d,
                        rot_width, col_start, half, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program: BLOCK_M positions of one (batch, head), one round, one factor of ``half`` columns."""
        pid_bh, pid_t, r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = pid_bh // heads, pid_bh % heads
        offs_m = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        b, h, offs_m = b.to(tl.int64), h.to(tl.int64), offs_m.to(tl.int64)  # offsets past 2^31 elements
        x = tl.load(x_ptr + b * stride_b + h * stride_h + offs_m[:, None] * stride_t + offs_d[None, :] * stride_d,
                    mask=(offs_m[:, None] < length) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)  # to TF32, nearest, ties away from zero (as `round_to_tf32`)
        x = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
        best_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_min = tl.full((BLOCK_M,), float("inf"), tl.float32)
        arg_max = tl.zeros((BLOCK_M,), tl.int32)
        arg_min = tl.zeros((BLOCK_M,), tl.int32)
        rot_base = rot_ptr + r * D * rot_width + col_start
        for n0 in range(0, half, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n[None, :] < half
            rot = tl.load(rot_base + offs_d[:, None] * rot_width + offs_n[None, :],
                          mask=(offs_d[:, None] < D) & valid, other=0.0)
            rotated = tl.dot(x, rot, input_precision="tf32")  # (BLOCK_M, BLOCK_N): exact products, fp32 sums
            tile_max, tile_arg_max = tl.max(tl.where(valid, rotated, float("-inf")), axis=1, return_indices=True)
            tile_min, tile_arg_min = tl.min(tl.where(valid, rotated, float("inf")), axis=1, return_indices=True)
            better_max, better_min = tile_max > best_max, tile_min < best_min  # strict: earlier columns win ties
            arg_max = tl.where(better_max, tile_arg_max + n0, arg_max)
            arg_min = tl.where(better_min, tile_arg_min + n0, arg_min)
            best_max = tl.where(better_max, tile_max, best_max)
            best_min = tl.where(better_min, tile_min, best_min)
        # argmax over [x, -x]: in x when max(x) >= max(-x), else half + argmin(x)  (as `lsh._round_buckets`)
        bucket = tl.where(best_max >= -best_min, arg_max, arg_min + half)
        tl.store(out_ptr + (pid_bh.to(tl.int64) * rounds + r) * length + offs_m, bucket.to(tl.int64),
                 mask=offs_m < length)


# Kernel configuration: positions per program, rotation columns per tile, warps, pipeline stages (fixed ahead of
# time: no autotuning at a user's first step). On an H200 (Triton 3.6; 8 heads, 4 rounds, bf16 queries) this
# took 198 us at 16K tokens (512 buckets) and 2.86 ms at 64K (2,048), where 64 columns per tile with 3 stages
# took 272 us and 3.53 ms (the best of nine configurations tried; the others took up to 280 us and 4.2 ms).
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 128, 32, 4, 2


def launch_buckets(vectors: torch.Tensor, rotations: torch.Tensor, num_buckets: int | list[int]) -> torch.Tensor:
    """The kernel itself: vectors (B, H, T, D) any float dtype and strides, rotations (R, D, rotation_width)
    -> buckets (B, H, R, T) int64, for buckets of size num_buckets (an even int or a factorised list)."""
    b, h, t, d = vectors.shape
    rounds, _, width = rotations.shape
    rotations = round_to_tf32(rotations.float()).contiguous()
    sizes = bucket_sizes(num_buckets)
    buckets, stride, start = None, 1, 0
    block_m, block_d = BLOCK_M, max(16, triton.next_power_of_2(d))
    for size in sizes:  # factorised buckets: b1-bucket + b1 * b2-bucket (as `lsh._round_buckets`)
        half = size // 2
        part = torch.empty(b, h, rounds, t, dtype=torch.long, device=vectors.device)
        block_n = min(BLOCK_N, max(16, triton.next_power_of_2(half)))
        grid = (b * h, triton.cdiv(t, block_m), rounds)
        with launch_device(vectors):
            _buckets_kernel[grid](vectors, rotations, part, h, t, rounds, *vectors.stride(), width, start, half,
                                  D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
                                  num_stages=NUM_STAGES)
        buckets = part if buckets is None else buckets + stride * part
        stride, start = stride * size, start + half
    return buckets


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest number with TF32's 10-bit mantissa (ties away from zero), still fp32. (Finite inputs:
    NaN payloads and numbers within half a unit of the largest float do not survive; hashing never sees them.)"""
    if x.dtype != torch.float32:
        raise ValueError(f"round_to_tf32 takes float32 tensors, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


if triton is not None:

    @torch.library.custom_op("subquadratic::lsh_buckets", mutates_args=(), device_types="cuda")
    def _lsh_buckets(vectors: torch.Tensor, rotations: torch.Tensor, num_buckets: list[int]) -> torch.Tensor:
        return launch_buckets(vectors, rotations, num_buckets)

    @_lsh_buckets.register_fake
    def _(vectors, rotations, num_buckets):
        b, h, t, _ = vectors.shape
        return vectors.new_empty((b, h, rotations.shape[0], t), dtype=torch.long)


def fused_buckets(vectors: torch.Tensor, rotations: torch.Tensor, num_buckets: int | list[int]) -> torch.Tensor:
    """`launch_buckets` as the custom op (opaque to torch.compile). CUDA only: see `kernel_available`."""
    sizes = bucket_sizes(num_buckets)
    return _lsh_buckets(vectors, rotations, sizes)
