"""`few_queries_attend` (the key axis in chunks) against `dense_attend` (one product over it), and
`few_keys_attend` / `few_keys_dense_attend` (the query axis in blocks) against `full_attend` / `dense_attend`
(one call)."""

from __future__ import annotations

import pytest
import torch

from subquadratic.modeling.attention.dense import (
    dense_attend,
    few_keys_attend,
    few_keys_dense_attend,
    few_queries_attend,
    full_attend,
    query_blocks,
)
from subquadratic.modeling.attention.masking import split_heads


@pytest.mark.parametrize("k,chunk", [(37, 4), (40, 8), (9, 4)])  # a last chunk to fill, whole chunks, too few keys
@pytest.mark.parametrize("per_query_mask", [False, True])
def test_chunked_keys_give_the_dense_result_and_gradients(k, chunk, per_query_mask):
    torch.manual_seed(0)
    query = torch.randn(2, 3, 4, 8, requires_grad=True)
    key, value = (torch.randn(2, 3, k, 8, requires_grad=True) for _ in range(2))
    shape = (2, 1, 4, k) if per_query_mask else (2, 1, 1, k)
    allowed = torch.rand(shape) < 0.7
    allowed[..., 0] = True  # no query without an allowed key
    weight = torch.randn(2, 3, 4, 8)
    results = []
    for attend in (dense_attend, lambda *args: few_queries_attend(*args, chunk=chunk)):
        out, lse = attend(query, key, value, allowed, 0.3)
        grads = torch.autograd.grad((out * weight).sum() + lse.sum(), [query, key, value])
        results.append([out, lse, *grads])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_query_blocks_keep_enough_thread_blocks_busy_at_short_lengths():
    assert query_blocks(4096) == 2  # 2048 queries each
    assert query_blocks(4096, rows=8) == 8  # further, to 512 each: 8 rows x 8 blocks
    assert query_blocks(16384, rows=8) == 8  # 2048 each already gives 64
    assert query_blocks(65536, rows=8) == 32
    assert query_blocks(4096, rows=64) == 2
    assert query_blocks(1024, rows=1) == 2  # not below 512 queries
    assert query_blocks(3 * 4096, rows=8) == 8
    assert query_blocks(4095, rows=1) == 1


@pytest.mark.parametrize("t,block", [(64, 8), (48, 8), (40, 16), (7, 2)])  # 8 blocks, 4 (48 = 16 * 3), 2, none
@pytest.mark.parametrize("masked", [False, True])
def test_query_blocks_give_the_one_call_result_and_gradients(t, block, masked):
    torch.manual_seed(0)
    b, h, k, d = 2, 3, 5, 8
    # queries as the projections leave them: (B, T, H * D) seen as (B, H, T, D)
    query = torch.randn(b, t, h * d, requires_grad=True)
    key, value = (torch.randn(b, h, k, d, requires_grad=True) for _ in range(2))
    key_ok = None
    if masked:
        key_ok = torch.rand(b, k) < 0.6
        key_ok[:, 0] = True
    weight = torch.randn(b, h, t, d)
    results = []
    for attend in (lambda q, kk, v, ok: full_attend(q, kk, v, ok, False),
                   lambda q, kk, v, ok: few_keys_attend(q, kk, v, ok, block=block)):
        out = attend(split_heads(query, h), key, value, key_ok)
        grads = torch.autograd.grad((out * weight).sum(), [query, key, value])
        results.append([out, *grads])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,block", [(64, 8), (48, 8), (7, 2)])  # 8 blocks, 4 (48 = 16 * 3), none
@pytest.mark.parametrize("mask_heads", [1, 3])  # one mask for all heads, or one per head
def test_query_blocks_give_the_dense_result_gradients_and_lse(t, block, mask_heads):
    torch.manual_seed(0)
    b, h, k, d = 2, 3, 5, 8
    query = torch.randn(b, t, h * d, requires_grad=True)
    key, value = (torch.randn(b, h, k, d, requires_grad=True) for _ in range(2))
    allowed = torch.rand(b, mask_heads, t, k) < 0.6
    allowed[..., 0] = True
    weight, lse_weight = torch.randn(b, h, t, d), torch.randn(b, h, t)
    results = []
    for attend in (dense_attend, lambda *args: few_keys_dense_attend(*args, block=block)):
        out, lse = attend(split_heads(query, h), key, value, allowed, 0.3)
        grads = torch.autograd.grad((out * weight).sum() + (lse * lse_weight).sum(), [query, key, value])
        results.append([out, lse, *grads])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
