"""Local (chunked) attention against full softmax attention over exactly the allowed pairs, and its FlexAttention
fast path against the readable path (on CPU the unfused reference; the compiled kernels on CUDA)."""

import math

import pytest
import torch

from subquadratic.modeling.attention import local as local_module
from subquadratic.modeling.attention.flex import build_block_mask, fast_paths
from subquadratic.modeling.attention.local import (
    LocalSelfAttention,
    chunk_band,
    chunk_reach,
    local_attend,
    local_attend_cached,
)
from subquadratic.modeling.cache import LayerStateCache
from tests.attention.fast_path_checks import (
    assert_compiled_fast_path_matches,
    assert_dropout_and_cpu_backward_stay_readable,
    check_gpu_bf16,
    check_gpu_compiled,
    check_gpu_fp32,
    cuda_only,
    gpu_runner,
    readable_and_fast,
    record_flex_calls,
)


def brute_force_local(q, k, v, chunk, before, after, causal, padding_mask=None):
    t = q.shape[2]
    i = torch.arange(t)
    qc, kc = i[:, None] // chunk, i[None, :] // chunk
    allowed = (kc >= qc - before) & (kc <= qc + (0 if causal else after))
    if causal:
        allowed &= i[None, :] <= i[:, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, -1e9)
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("before,after", [(1, 0), (0, 1), (2, 1), (0, 0)])
def test_equals_brute_force(causal, before, after):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 8) for _ in range(3))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False
    out = local_attend(q, k, v, 4, before, after, causal, mask)
    ref = brute_force_local(q, k, v, 4, before, after, causal, mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, :17], ref[1, :, :17], atol=1e-5, rtol=1e-5)


def test_window_covering_everything_is_full_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    torch.testing.assert_close(local_attend(q, k, v, 16, 1, 1, False), full, atol=1e-5, rtol=1e-5)


def test_cached_matches_full():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 8) for _ in range(3))
    full = local_attend(q, k, v, 4, 1, 0, True)
    for t in (1, 4, 9, 20):
        step = local_attend_cached(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t], 4, 1)
        torch.testing.assert_close(step[:, :, 0], full[:, :, t - 1], atol=1e-5, rtol=1e-5)


def test_module_is_causal():
    torch.manual_seed(0)
    attn = LocalSelfAttention(16, 2, 8, chunk_length=4, chunks_before=1, causal=True).eval()
    x = torch.randn(1, 16, 16)
    y = x.clone()
    y[:, 9:] = 0
    torch.testing.assert_close(attn(x)[:, :9], attn(y)[:, :9])


@pytest.mark.parametrize("causal", [True, False])
def test_covering_chunks_take_the_sdpa_path_with_the_same_numbers(causal, monkeypatch):
    torch.manual_seed(0)
    attn = LocalSelfAttention(16, 2, 8, chunk_length=8, chunks_before=2, chunks_after=2, causal=causal).eval()
    x = torch.randn(2, 24, 16)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 19:] = False
    assert attn.covers(24) and not attn.covers(32)
    fast = attn(x, padding_mask=mask)
    monkeypatch.setattr(LocalSelfAttention, "covers", lambda self, length: False)
    readable = attn(x, padding_mask=mask)
    torch.testing.assert_close(fast[0], readable[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1, :19], readable[1, :19], atol=1e-5, rtol=1e-5)


# --- FlexAttention fast path ---------------------------------------------------------------------------------

@pytest.fixture
def flex_calls(monkeypatch):
    return record_flex_calls(monkeypatch, local_module)


FAST_COMBOS = [  # chunk, length (never a multiple of 128), chunks before, chunks after, padded from (row 1)
    (16, 80, 1, 0, 69),
    (16, 80, 0, 1, 50),
    (32, 160, 2, 1, 100),
    (64, 192, 1, 1, None),
    (64, 320, 1, 0, 250),
    (16, 48, 0, 0, 40),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk,t,before,after,pad_from", FAST_COMBOS)
def test_fast_path_matches_readable_path(chunk, t, before, after, pad_from, causal, flex_calls):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, t, 8) for _ in range(3))
    padding = torch.ones(2, t, dtype=torch.bool)
    if pad_from is not None:
        padding[1, pad_from:] = False
    mask = None if pad_from is None else padding
    expected, got = readable_and_fast(local_attend, q, k, v, chunk, before, after, causal, mask)
    assert flex_calls == [(2, 2, t, 8)]
    # a padding query may see no real key: its (unused) output then differs between the paths, but is finite
    real = padding[:, None, :].expand(-1, 2, -1)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_of_the_module_matches_readable_path(causal, flex_calls):
    torch.manual_seed(0)
    attn = LocalSelfAttention(16, 2, 8, chunk_length=16, chunks_before=1, chunks_after=1, causal=causal).eval()
    x = torch.randn(2, 64, 16)
    padding = torch.ones(2, 64, dtype=torch.bool)
    padding[0, 45:] = False
    expected, got = readable_and_fast(attn, x, padding_mask=padding)
    assert len(flex_calls) == 1
    torch.testing.assert_close(got[padding], expected[padding], atol=1e-5, rtol=1e-5)


def test_fast_path_is_skipped_where_it_cannot_run(flex_calls):
    """Attention dropout in training, gradients on CPU (FlexAttention has no CPU backward), cached decoding and
    windows that cover the sequence (SDPA) take other paths even when fast paths are forced."""
    attn = LocalSelfAttention(16, 2, 8, chunk_length=4, chunks_before=1, dropout=0.1).train()
    x = torch.randn(1, 16, 16)
    assert_dropout_and_cpu_backward_stay_readable(attn, x, flex_calls)
    attn.eval()
    with fast_paths(True):
        with torch.no_grad():
            attn(x[:, :8])  # two chunks, one before: the window covers them (SDPA)
            assert not flex_calls
            cache = LayerStateCache()
            attn(x[:, :12], cache=cache)  # the prompt: a full pass, which takes the fast path
            assert len(flex_calls) == 1
            attn(x[:, 12:13], padding_mask=torch.ones(1, 13, dtype=torch.bool), cache=cache)
        assert len(flex_calls) == 1


def test_compiled_module_with_fast_path_matches_readable_path(flex_calls):
    torch.manual_seed(0)
    attn = LocalSelfAttention(16, 2, 8, chunk_length=16, chunks_before=1, causal=True).eval()
    x = torch.randn(2, 96, 16)  # a length no other test uses: the block mask is built inside the compiled region
    padding = torch.ones(2, 96, dtype=torch.bool)
    padding[1, 50:] = False
    assert_compiled_fast_path_matches(attn, x, padding, flex_calls, real_only=True)


# GPU: the compiled kernels (block sparsity, full blocks, the padding score_mod) and their backward, which the CPU
# reference above does not exercise.
GPU_COMBOS = [  # causal, chunk, chunks before, after, length; hidden 128, 4 heads of 32, row 0 padded
    (True, 64, 1, 0, 320),  # 320: not a multiple of the 128-token blocks
    (False, 64, 1, 1, 320),
    (False, 32, 2, 0, 352),
    (False, 128, 1, 0, 384),  # chunk = block: whole blocks of the band are full, the padding score_mod still runs
]


def gpu_case(causal, chunk, before, after, t, hidden=128):
    torch.manual_seed(0)
    attn = LocalSelfAttention(hidden, 4, 32, chunk, before, after, causal=causal).cuda()
    assert not attn.covers(t)
    return attn, gpu_runner(attn, t, hidden)


@cuda_only
@pytest.mark.parametrize("causal,chunk,before,after,t", GPU_COMBOS)
def test_gpu_fast_path_matches_readable_path_fp32(causal, chunk, before, after, t, flex_calls):
    check_gpu_fp32(gpu_case(causal, chunk, before, after, t)[1], flex_calls, calls=1)


@cuda_only
@pytest.mark.parametrize("causal,chunk,before,after,t", GPU_COMBOS)
def test_gpu_fast_path_under_bf16_autocast_is_as_accurate_as_readable_path(causal, chunk, before, after, t,
                                                                            flex_calls):
    check_gpu_bf16(gpu_case(causal, chunk, before, after, t)[1], flex_calls, calls=1)


@cuda_only
def test_gpu_compiled_module_with_fast_path_matches_readable_path(flex_calls):
    check_gpu_compiled(*gpu_case(True, 64, 1, 0, 448), flex_calls)


@pytest.mark.parametrize("chunk, before, after, causal", [(8, 1, 0, True), (8, 1, 0, False), (12, 2, 1, False),
                                                          (16, 0, 2, False)])
def test_chunk_reach_bounds_the_band(chunk, before, after, causal):
    """The reach given to the block-mask builder is a true bound: with it, the builder (which then skips key blocks
    beyond it) gives the block mask torch's create_block_mask builds from the whole mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    band = chunk_band(chunk, before, after, causal)
    length = 20 * chunk
    ours = build_block_mask(band, None, None, length, length, "cpu", block_size=16,
                            reach=chunk_reach(chunk, before, after, causal))
    theirs = create_block_mask(band, None, None, length, length, "cpu", BLOCK_SIZE=16)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
