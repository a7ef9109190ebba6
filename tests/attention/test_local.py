"""Local (chunked) attention against full softmax attention over exactly the allowed pairs."""

import math

import pytest
import torch

from subquadratic.modeling.attention.local import LocalSelfAttention, local_attend, local_attend_cached


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
