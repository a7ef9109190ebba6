"""The fused LSH hash (`hash_kernel`, Triton) against the readable hash of `lsh.hash_vectors`.

Where these run: `triton_checks` (the test of the TF32 rounding both paths share runs everywhere)."""

from __future__ import annotations

import pytest
import torch

from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.attention.hash_kernel import fused_buckets, launch_buckets, round_to_tf32
from subquadratic.modeling.attention.lsh import hash_vectors, rotation_width
from subquadratic.modeling.attention.masking import split_heads
from tests.attention.triton_checks import DEVICE, needs_kernel


def readable(vectors, rotations, num_buckets):
    with fast_paths(False):
        return hash_vectors(vectors, rotations, num_buckets)


def assert_same_buckets_but_near_ties(got, vectors, rotations, num_buckets):
    """Buckets equal the readable ones, except (rarely) where a vector's two largest coordinates of [xR, -xR] in
    some factor (x and R rounded to TF32, as both paths do) are within fp32 rounding of each other."""
    expected = readable(vectors, rotations, num_buckets)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    differ = got != expected
    if not differ.any():
        return
    assert differ.float().mean() < 1e-3
    rotated = torch.einsum("bhtd,rdw->bhrtw", round_to_tf32(vectors.float()).double(),
                           round_to_tf32(rotations.float()).double())
    sizes = num_buckets if isinstance(num_buckets, list) else [num_buckets]
    margins, start = [], 0
    for size in sizes:
        part = rotated[..., start:start + size // 2]
        top2 = torch.cat([part, -part], dim=-1).topk(2, dim=-1).values
        margins.append((top2[..., 0] - top2[..., 1]) / top2[..., 0].abs().clamp_min(1e-30))
        start += size // 2
    margin = torch.stack(margins).min(dim=0).values
    assert (margin[differ] < 1e-5).all()


def test_tf32_rounding_is_nearest_keeps_bf16_and_is_idempotent():
    torch.manual_seed(0)
    x = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    rounded = round_to_tf32(x)
    assert ((rounded - x).abs() <= x.abs() * 2.0 ** -11).all()  # half a unit of the 10-bit mantissa
    assert (rounded.view(torch.int32) & 0x1FFF == 0).all()  # the 13 low mantissa bits are gone
    assert torch.equal(round_to_tf32(rounded), rounded)
    bf16 = x.bfloat16().float()
    assert torch.equal(round_to_tf32(bf16), bf16)
    assert torch.equal(round_to_tf32(torch.tensor([1 + 2.0 ** -11, -(1 + 2.0 ** -11)])),
                       torch.tensor([1 + 2.0 ** -10, -(1 + 2.0 ** -10)]))  # ties away from zero
    with pytest.raises(ValueError, match="float32"):  # other dtypes' bits would be read as fp32
        round_to_tf32(x.double())


@needs_kernel
@pytest.mark.parametrize("num_buckets,head_size,length", [
    (8, 32, 200),        # few columns (one masked tile), a last block of positions cut short
    (300, 64, 130),      # 150 columns: two tiles, the second mostly masked
    (2048, 64, 64),      # the benchmark's 64K-token setting: 1,024 columns in 8 tiles
    ([4, 6], 48, 96),    # factorised buckets, a head size that is not a power of two
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_buckets_match_the_readable_hash(num_buckets, head_size, length, dtype):
    torch.manual_seed(0)
    heads, rounds = 3, 2
    # vectors as the projections leave them: (B, T, H * D) seen as (B, H, T, D), not contiguous
    vectors = split_heads(torch.randn(2, length, heads * head_size, device=DEVICE).to(dtype), heads)
    rotations = torch.randn(rounds, head_size, rotation_width(num_buckets), device=DEVICE)
    got = launch_buckets(vectors, rotations, num_buckets)
    assert_same_buckets_but_near_ties(got, vectors.float(), rotations, num_buckets)


@needs_kernel
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the custom op is registered for CUDA")
def test_gpu_hash_vectors_takes_the_kernel_also_compiled_and_padded(monkeypatch):
    import subquadratic.modeling.attention.lsh as lsh

    torch.manual_seed(1)
    vectors = torch.randn(2, 4, 256, 64, device="cuda")
    rotations = torch.randn(4, 64, 32, device="cuda")
    padding = torch.ones(2, 256, dtype=torch.bool, device="cuda")
    padding[1, 200:] = False
    calls = []
    monkeypatch.setattr(lsh, "fused_buckets", lambda *a: calls.append(1) or fused_buckets(*a))
    eager = hash_vectors(vectors, rotations, 64, padding)
    assert calls
    assert (eager[1, :, :, 200:] == 64).all()  # padding: the extra bucket
    assert_same_buckets_but_near_ties(eager[:, :, :, :200], vectors[:, :, :200], rotations, 64)
    compiled = torch.compile(lambda v, r: fused_buckets(v, r, 64), fullgraph=True)(vectors, rotations)
    assert torch.equal(compiled, fused_buckets(vectors, rotations, 64))
