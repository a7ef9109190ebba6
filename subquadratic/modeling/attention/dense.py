"""Attention over an explicit mask of allowed (query, key) pairs.

Used where the number of queries is small (cached incremental decoding) and as the plain building block the
chunked mechanisms reduce to inside each chunk."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .masking import MASK_VALUE, softmax_with_lse


def _weighted_values(probs: torch.Tensor, value: torch.Tensor, dropout: torch.nn.Module | None) -> torch.Tensor:
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs.to(value.dtype), value)


def dense_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
                 scale: float, dropout: torch.nn.Module | None = None, self_mask: torch.Tensor | None = None):
    """query (..., Q, D), key/value (..., K, D), allowed/self_mask broadcastable to (..., Q, K).

    Returns (out (..., Q, D) in value's dtype, logsumexp (..., Q) in fp32).

    Memory for backward: the softmax keeps its fp32 probabilities only (`softmax_with_lse`). When the matmul with
    the values would keep another (..., Q, K) tensor -- the probabilities after dropout, or their copy in a lower
    dtype (value's, or autocast's) -- that step is recomputed in backward from the fp32 probabilities instead
    (`checkpoint` replays the same dropout mask), so results and gradients are those of the plain formula. Unless
    there are no more keys than the head size (K <= D, as for a few global keys): then that tensor is no larger
    than the output, and recomputing it would cost more kernel launches than it saves memory."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    probs, lse = softmax_with_lse(scores, allowed, self_mask)
    dropping = dropout is not None and dropout.training
    copies = dropping or value.dtype != probs.dtype or torch.is_autocast_enabled(value.device.type)
    if (copies and key.shape[-2] > value.shape[-1] and torch.is_grad_enabled()
            and (probs.requires_grad or value.requires_grad)):
        out = checkpoint(_weighted_values, probs, value, dropout, use_reentrant=False)
    else:
        out = _weighted_values(probs, value, dropout)
    return out, lse


# Key positions per product in `few_queries_attend`.
LONG_KEY_CHUNK = 1024


def few_queries_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                       scale: float, dropout: torch.nn.Module | None = None, chunk: int | None = None):
    """`dense_attend` for a few queries over many keys (global tokens attending to a whole sequence).

    query (B, H, Q, D), key/value (B, H, K, D), allowed broadcastable to (B, H, Q, K). The key axis is cut into
    chunks of ``chunk`` (default `LONG_KEY_CHUNK`), so that each product that sums over it (the probabilities
    times the values, and in the backward pass the score gradient times the keys) runs as many short products
    added up, not as one long reduction with a tiny (Q, D) result: on an H200 that ran on a handful of thread
    blocks, 0.76 ms for 4 queries over 64K keys. Keys added to fill the last chunk are never allowed (a query with
    no allowed key, whose output no caller uses, averages over them too). Returns (out (B, H, Q, D) in value's
    dtype, logsumexp (B, H, Q))."""
    b, h, q, d = query.shape
    k = key.shape[2]
    chunk = chunk or LONG_KEY_CHUNK
    if k <= 2 * chunk:
        return dense_attend(query, key, value, allowed, scale, dropout)
    n = -(-k // chunk)
    extra = n * chunk - k
    def in_chunks(x):  # (B, H, K, D) -> (B, H, n, chunk, D), padded with zeros
        return (torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x).reshape(b, h, n, chunk, d)

    key, value = (in_chunks(key), in_chunks(value)) if value is not key else (in_chunks(key),) * 2
    allowed = torch.nn.functional.pad(allowed, (0, extra), value=False)
    scores = torch.matmul(query[:, :, None], key.transpose(-1, -2))  # (B, H, n, Q, chunk)
    scores = scores.transpose(2, 3).reshape(b, h, q, n * chunk) * scale
    probs, lse = softmax_with_lse(scores, allowed)
    if dropout is not None:
        probs = dropout(probs)
    probs = probs.to(value.dtype).view(b, h, q, n, chunk).transpose(2, 3)  # (B, H, n, Q, chunk)
    return torch.matmul(probs, value).sum(dim=2), lse


def full_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_ok: torch.Tensor | None,
                causal: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """Plain softmax attention through `scaled_dot_product_attention` (flash or memory-efficient kernels), for
    mechanisms whose window covers the whole sequence, where their result is exactly full attention.

    query/key/value (B, H, T, D); key_ok (B, T) bool, True for keys that may be attended. The mask is additive
    and finite (MASK_VALUE), as in `softmax_with_lse`, so a query with no allowed key averages instead of giving
    NaN. Returns (B, H, T, D)."""
    t = key.shape[2]
    mask = None
    if key_ok is not None:
        mask = torch.zeros(key_ok.shape, dtype=query.dtype, device=query.device).masked_fill(~key_ok, MASK_VALUE)
        mask = mask[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        later = torch.ones(t, t, dtype=torch.bool, device=query.device).triu(1)
        causal_mask = torch.zeros(t, t, dtype=query.dtype, device=query.device).masked_fill(later, MASK_VALUE)
        mask = causal_mask if mask is None else mask + causal_mask
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)


# Queries per block in `few_keys_attend` and `few_keys_dense_attend`, at least: the length is halved while the
# halves keep this many (so between QUERY_BLOCK and twice it when the length has enough factors of two; a length
# with none, an odd one, is not cut).
QUERY_BLOCK = 2048
# ... and in `few_keys_attend` further, down to SMALL_QUERY_BLOCK queries, while (batch x heads x blocks) is below
# BUSY_BLOCKS: its backward kernel runs a thread block per block of keys, head and batch entry, which left most of
# an H200 idle at 4K tokens (8 heads, 256 keys: fwd+bwd 89 us per layer in 2 blocks, 61 in 8; BENCHMARKS.md).
SMALL_QUERY_BLOCK = 512
BUSY_BLOCKS = 64


def query_blocks(length: int, block: int | None = None, rows: int | None = None) -> int:
    """How many blocks `few_keys_attend` and `few_keys_dense_attend` cut ``length`` queries into: halved while the
    halves keep at least ``block`` (default `QUERY_BLOCK`) queries, so a power of two that divides the length.
    ``rows``: the batch entries times heads; then also halved while rows x blocks is below `BUSY_BLOCKS` and the
    halves keep at least `SMALL_QUERY_BLOCK` queries (or ``block``, if smaller)."""
    block = block or QUERY_BLOCK
    small = min(block, SMALL_QUERY_BLOCK)
    n = 1
    while length % (2 * n) == 0 and (length // (2 * n) >= block or (
            rows is not None and rows * n < BUSY_BLOCKS and length // (2 * n) >= small)):
        n *= 2
    return n


def few_keys_dense_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                          scale: float, dropout: torch.nn.Module | None = None, block: int | None = None):
    """`dense_attend` for many queries over few keys (every token over a handful of global tokens), with the
    query axis in `query_blocks` blocks.

    query (B, H, T, D), key/value (B, H, K, D), allowed (B or 1, H or 1, T, K). The products that sum over the
    queries in the backward pass (the gradients of the keys and values, (K, D) each) would otherwise run as one
    long reduction per head with a tiny result: on an H200, 0.71 ms each for 64K queries over 16 keys. In blocks
    they are one short product per block, added up by autograd. Returns (out (B, H, T, D), logsumexp (B, H, T))."""
    b, h, t, d = query.shape
    n = query_blocks(t, block)
    if n == 1:
        return dense_attend(query, key, value, allowed, scale, dropout)
    q = query.unflatten(2, (n, t // n))  # (B, H, n, T/n, D)
    ok = allowed.unflatten(2, (n, t // n))  # (B, H, n, T/n, K)
    out, lse = dense_attend(q, key[:, :, None], value[:, :, None], ok, scale, dropout)
    return out.flatten(2, 3), lse.flatten(2, 3)


def few_keys_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_ok: torch.Tensor | None,
                    dropout_p: float = 0.0, block: int | None = None) -> torch.Tensor:
    """`full_attend` (not causal) for many queries over few keys (Linformer's T queries over k projected keys).

    query (B, H, T, D), key/value (B, H, K, D), key_ok (B, K) bool or None. The queries are cut into blocks
    (`query_blocks` with rows = B x H; ``block``: at least this many queries, default `QUERY_BLOCK`) that become
    extra batch entries, each with a copy of the few keys and values
    (whose gradients autograd sums back). The results are those of one call; what changes is the backward pass of
    the fused kernels, which runs one thread block per block of keys and head: with 256 keys and 8 heads, 16 of
    them walked all 64K queries (1.5 ms per layer on an H200; the forward pass is split over queries already)."""
    b, h, t, d = query.shape
    n = query_blocks(t, block, rows=b * h)
    if n == 1:
        return full_attend(query, key, value, key_ok, False, dropout_p)
    # (B, H, n, T/n, D) -> (B * n, H, T/n, D): a view when T is the outer axis of the memory, as after split_heads
    q = query.unflatten(2, (n, t // n)).transpose(1, 2).reshape(b * n, h, t // n, d)
    k, v = (x[:, None].expand(b, n, *x.shape[1:]).reshape(b * n, *x.shape[1:]) for x in (key, value))
    ok = None if key_ok is None else key_ok.repeat_interleave(n, dim=0)
    out = full_attend(q, k, v, ok, False, dropout_p)  # (B * n, H, T/n, D)
    return out.view(b, n, h, t // n, d).transpose(1, 2).reshape(b, h, t, d)
