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


class _MaskedSoftmax(torch.autograd.Function):
    """Masked fp32 softmax and its log-sum-exp, keeping only the probabilities (and the masks) for backward.

    Forward: x = scores in fp32, with x = MASK_VALUE where ``allowed`` is False and then x = SELF_MASK_VALUE where
    ``self_mask`` is True (the self mask wins); lse = logsumexp(x); p = exp(x - lse).

    Backward: d lse / d x_j = p_j and d p_i / d x_j = p_i (delta_ij - p_j), so with upstream gradients g (for p)
    and h (for lse)
        dL/dx_j = sum_i g_i p_i (delta_ij - p_j) + h p_j = p_j (g_j - sum_i g_i p_i) + h p_j.
    p is all that is needed. A masked position took a constant, not its score, so its gradient is zero.

    Autograd on the plain formula keeps the masked scores (for logsumexp) and p (for exp): two fp32 copies of the
    (..., Q, K) scores where this keeps one."""

    @staticmethod
    def forward(ctx, scores, allowed, self_mask):
        x = scores.float()
        if allowed is not None:
            x = x.masked_fill(~allowed, MASK_VALUE)
        if self_mask is not None:
            x = x.masked_fill(self_mask, SELF_MASK_VALUE)
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        probs = (x - lse).exp_()
        ctx.save_for_backward(probs, allowed, self_mask)
        ctx.scores_dtype = scores.dtype
        ctx.set_materialize_grads(False)
        return probs, lse.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_probs, grad_lse):
        probs, allowed, self_mask = ctx.saved_tensors
        grad = torch.zeros_like(probs)
        if grad_probs is not None:
            grad = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        if grad_lse is not None:
            grad = grad + probs * grad_lse.unsqueeze(-1)
        if allowed is not None:
            grad = grad.masked_fill_(~allowed, 0.0)
        if self_mask is not None:
            grad = grad.masked_fill_(self_mask, 0.0)
        return grad.to(ctx.scores_dtype), None, None


def softmax_with_lse(scores: torch.Tensor, allowed: torch.Tensor | None, self_mask: torch.Tensor | None = None):
    """Softmax over the last axis in fp32 (also under autocast), returning (probs, logsumexp), without dropout.

    ``allowed`` masks key positions (False -> MASK_VALUE); ``self_mask`` marks a query's own key, which gets
    SELF_MASK_VALUE (shared-QK attention), whatever ``allowed`` says. Gradients flow through both results; for
    backward only the fp32 probabilities are kept (`_MaskedSoftmax`)."""
    return _MaskedSoftmax.apply(scores, allowed, self_mask)

