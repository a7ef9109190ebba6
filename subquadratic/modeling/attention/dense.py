"""Attention over an explicit mask of allowed (query, key) pairs.

Used where the number of queries is small (cached incremental decoding) and as the plain building block the
chunked mechanisms reduce to inside each chunk."""

from __future__ import annotations

import torch

from .masking import masked_softmax


def dense_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
                 scale: float, dropout: torch.nn.Module | None = None, self_mask: torch.Tensor | None = None):
    """query (..., Q, D), key/value (..., K, D), allowed/self_mask broadcastable to (..., Q, K).

    Returns (out (..., Q, D) in value's dtype, logsumexp (..., Q) in fp32)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    probs, lse = masked_softmax(scores, allowed, dropout, self_mask)
    return torch.matmul(probs.to(value.dtype), value), lse
