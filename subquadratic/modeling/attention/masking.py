"""Helpers shared by the attention modules: mask values, head reshapes, fp32 softmax with its log-sum-exp."""

from __future__ import annotations

import torch

# Finite mask values keep a query whose keys are all masked from producing NaN (it then averages its window).
MASK_VALUE = -1e9
# Score given to a token's own key in shared-QK attention: low enough to lose to any allowed key, high enough to
# win when nothing else is allowed (Reformer, section 2).
SELF_MASK_VALUE = -1e5


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)"""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None, dropout: torch.nn.Module | None = None,
                   self_mask: torch.Tensor | None = None):
    """Softmax over the last axis in fp32 (also under autocast), returning (probs, logsumexp).

    ``allowed`` masks key positions (False -> MASK_VALUE); ``self_mask`` marks a query's own key, which gets
    SELF_MASK_VALUE (shared-QK attention)."""
    scores = scores.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, MASK_VALUE)
    if self_mask is not None:
        scores = scores.masked_fill(self_mask, SELF_MASK_VALUE)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)
    if dropout is not None:
        probs = dropout(probs)
    return probs, lse.squeeze(-1)
