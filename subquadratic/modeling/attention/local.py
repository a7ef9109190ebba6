"""Local (chunked) self-attention: the sequence is cut into chunks of `chunk_length`, and each chunk attends to
itself, `chunks_before` chunks before it and `chunks_after` chunks after it (Reformer's local layers; also the
attention of the Image Transformer and of `local-attention`). Which keys a query sees depends only on positions, so
causal local attention is exactly causal.

The allowed pairs form a static band of chunks, so where `flex.use_fast_path` says so (CUDA by default) the attention
runs through FlexAttention with a cached block mask of that band; padding, which changes per batch, is applied by a
score_mod instead, so that the block mask stays cacheable."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cache import LayerStateCache
from .dense import dense_attend, full_attend
from .flex import cached_block_mask, flex_attention, flex_can_run
from .masking import MASK_VALUE, merge_heads, split_heads
from .projections import project


def _look_around(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(B, H, n, C, ...) -> (B, H, n, (before + 1 + after) * C, ...): each chunk with its neighbours."""
    pieces = [x.roll(offset, dims=2) for offset in range(before, -after - 1, -1)]
    return torch.cat(pieces, dim=3)


def chunk_band(chunk_length: int, chunks_before: int, chunks_after: int, causal: bool):
    """mask_mod of the static pattern of chunked attention: a query of chunk i sees keys of chunks i - before to
    i + after (and none later than itself when causal). Depends only on its arguments and the indices, so the
    block mask built from it can be cached; every block it marks full really is full."""
    def mask_mod(b, h, q_idx, kv_idx):
        back = q_idx // chunk_length - kv_idx // chunk_length  # chunks from the key's chunk up to the query's
        allowed = (back <= chunks_before) & (back >= -chunks_after)
        return allowed & (kv_idx <= q_idx) if causal else allowed
    return mask_mod


def chunk_reach(chunk_length: int, chunks_before: int, chunks_after: int, causal: bool) -> tuple[int, int]:
    """How far before and after its query a key allowed by `chunk_band` can be, in positions (the ``reach`` of
    `flex.build_block_mask`, which then evaluates the mask only near the diagonal)."""
    return (chunks_before + 1) * chunk_length - 1, 0 if causal else (chunks_after + 1) * chunk_length - 1


def local_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk_length: int, chunks_before: int,
                 chunks_after: int, causal: bool, padding_mask: torch.Tensor | None = None,
                 dropout: nn.Module | None = None) -> torch.Tensor:
    """query/key/value (B, H, T, D) with T a multiple of ``chunk_length``; padding_mask (B, T) bool, True for real
    keys. Returns (B, H, T, D)."""
    if causal:
        chunks_after = 0
    if flex_can_run(query, dropout):
        return _local_attend_flex(query, key, value, chunk_length, chunks_before, chunks_after, causal, padding_mask)
    b, h, t, d = query.shape
    c = chunk_length
    n = t // c
    q = query.view(b, h, n, c, d)
    k = _look_around(key.view(b, h, n, c, d), chunks_before, chunks_after)
    v = _look_around(value.view(b, h, n, c, d), chunks_before, chunks_after)

    positions = torch.arange(t, device=query.device).view(1, 1, n, c)
    q_pos = positions[0, 0]  # (n, C)
    k_pos = _look_around(positions, chunks_before, chunks_after)[0, 0]  # (n, W*C)
    k_chunk = torch.arange(n, device=query.device)[:, None] + torch.arange(
        chunks_before, -chunks_after - 1, -1, device=query.device).neg().repeat_interleave(c)[None, :]
    allowed = ((k_chunk >= 0) & (k_chunk < n))[:, None, :]  # (n, 1, W*C): drop chunks wrapped around the ends
    if causal:
        allowed = allowed & (k_pos[:, None, :] <= q_pos[:, :, None])
    if padding_mask is not None:
        key_ok = _look_around(padding_mask.bool().view(b, 1, n, c), chunks_before, chunks_after)  # (B, 1, n, W*C)
        allowed = allowed & key_ok[:, :, :, None, :]
    out, _ = dense_attend(q, k, v, allowed, 1.0 / math.sqrt(d), dropout)
    return out.view(b, h, t, d)


def _local_attend_flex(query, key, value, chunk_length, chunks_before, chunks_after, causal, padding_mask):
    """`local_attend` through FlexAttention. Same allowed pairs; the band is the (cached) block mask, padding keys
    score MASK_VALUE as in the readable path (finite, and every real query keeps its own key, so no row is empty).
    Queries of padding tokens may differ from the readable path: those outputs are never used."""
    t = query.shape[2]
    band = chunk_band(chunk_length, chunks_before, chunks_after, causal)
    block_mask = cached_block_mask(("local", chunk_length, chunks_before, chunks_after, causal), band,
                                   None, None, t, t, query.device,
                                   reach=chunk_reach(chunk_length, chunks_before, chunks_after, causal))
    score_mod = None
    if padding_mask is not None:
        key_ok = padding_mask.bool()

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(key_ok[b, kv_idx], score, MASK_VALUE)
    return flex_attention(query, key, value, block_mask=block_mask, score_mod=score_mod,
                          scale=1.0 / math.sqrt(query.shape[-1]))


def local_attend_cached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk_length: int,
                        chunks_before: int, padding_mask: torch.Tensor | None = None,
                        dropout: nn.Module | None = None) -> torch.Tensor:
    """Causal local attention of the last Q positions over all T keys (incremental decoding)."""
    t, q_len = key.shape[2], query.shape[2]
    positions = torch.arange(t, device=query.device)
    q_pos = positions[t - q_len:]
    allowed = ((positions[None, :] <= q_pos[:, None])
               & (positions[None, :] // chunk_length >= q_pos[:, None] // chunk_length - chunks_before))
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, None, :]
    out, _ = dense_attend(query, key, value, allowed, 1.0 / math.sqrt(query.shape[-1]), dropout)
    return out


class LocalSelfAttention(nn.Module):
    """Multi-head local (chunked) self-attention with separate query, key and value projections.

    Args:
        hidden_size: width of the input and output.
        num_heads, head_size: heads and their width.
        chunk_length: chunk length; inputs must be a multiple of it.
        chunks_before, chunks_after: neighbouring chunks each chunk attends to (`chunks_after` is ignored when
            causal).
        causal: autoregressive masking.
        dropout: dropout on attention probabilities.
        layer_idx: the layer this module sits in (its slot in a `LayerStateCache`).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_size: int, chunk_length: int, chunks_before: int = 1,
                 chunks_after: int = 0, causal: bool = True, dropout: float = 0.0, layer_idx: int = 0):
        super().__init__()
        self.num_heads, self.chunk_length = num_heads, chunk_length
        self.chunks_before, self.chunks_after = chunks_before, chunks_after
        self.causal, self.layer_idx = causal, layer_idx
        self.query = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.key = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.output = nn.Linear(num_heads * head_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def covers(self, length: int) -> bool:
        """Whether every chunk attends to the whole sequence of ``length`` tokens (a multiple of the chunk)."""
        chunks = -(-length // self.chunk_length)
        return self.chunks_before >= chunks - 1 and (self.causal or self.chunks_after >= chunks - 1)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None,
                cache: LayerStateCache | None = None) -> torch.Tensor:
        """hidden_states (B, T, hidden); padding_mask (B, T_all) bool, True for real tokens, covering the cached
        positions too when decoding. Returns (B, T, hidden)."""
        query, key, value = (split_heads(x, self.num_heads)
                             for x in project(hidden_states, [self.query, self.key, self.value]))
        if cache is not None and cache.has(self.layer_idx):
            key = cache.append(self.layer_idx, "key", key, seq_dim=2)
            value = cache.append(self.layer_idx, "value", value, seq_dim=2)
            out = local_attend_cached(query, key, value, self.chunk_length, self.chunks_before, padding_mask,
                                      self.dropout)
        else:
            if cache is not None:
                cache.append(self.layer_idx, "key", key, seq_dim=2)
                cache.append(self.layer_idx, "value", value, seq_dim=2)
            if self.covers(query.shape[2]):  # every chunk sees every key: exactly full attention
                dropout_p = self.dropout.p if self.training else 0.0
                out = full_attend(query, key, value, padding_mask, self.causal, dropout_p)
            else:
                out = local_attend(query, key, value, self.chunk_length, self.chunks_before, self.chunks_after,
                                   self.causal, padding_mask, self.dropout)
        return self.output(merge_heads(out))
