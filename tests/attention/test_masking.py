"""`softmax_with_lse` / `dense_attend` against the plain formula: same results and gradients, fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subquadratic.modeling.attention.dense import dense_attend
from subquadratic.modeling.attention.masking import MASK_VALUE, SELF_MASK_VALUE, softmax_with_lse

Q, K, D = 6, 9, 8
SHAPE = (2, 3)  # batch, heads


def reference_softmax(scores, allowed, self_mask):
    """The straightforward formula, differentiated by autograd."""
    x = scores.float()
    if allowed is not None:
        x = x.masked_fill(~allowed, MASK_VALUE)
    if self_mask is not None:
        x = x.masked_fill(self_mask, SELF_MASK_VALUE)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return torch.exp(x - lse), lse.squeeze(-1)


def reference_attend(query, key, value, allowed, scale, dropout=None, self_mask=None):
    probs, lse = reference_softmax(torch.matmul(query, key.transpose(-1, -2)) * scale, allowed, self_mask)
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs.to(value.dtype), value), lse


def masks(kind: str):
    """allowed (B, 1, Q, K), self_mask (Q, K) for one kind of case."""
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(SHAPE[0], 1, Q, K, generator=g) > 0.4
    self_mask = torch.eye(Q, K, dtype=torch.bool)
    if kind == "none":
        return None, None
    if kind == "allowed":
        return allowed, None
    if kind == "self":
        return None, self_mask
    if kind == "both":
        return allowed, self_mask
    if kind == "empty_rows":  # row 0: nothing allowed; row 1: only its own (self-masked) key
        allowed = allowed.clone()
        allowed[:, :, 0] = False
        allowed[:, :, 1] = False
        allowed[:, :, 1, 1] = True
        return allowed, self_mask
    raise ValueError(kind)


KINDS = ["none", "allowed", "self", "both", "empty_rows"]


def leaves(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*SHAPE, n, D, generator=g) * 2).to(dtype).requires_grad_() for n in (Q, K, K)]


@pytest.mark.parametrize("kind", KINDS)
def test_softmax_with_lse_matches_reference(kind):
    allowed, self_mask = masks(kind)
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(*SHAPE, Q, K, generator=g) * 4).requires_grad_()
    up_p, up_l = torch.randn(*SHAPE, Q, K, generator=g), torch.randn(*SHAPE, Q, generator=g)
    results = []
    for fn in (softmax_with_lse, reference_softmax):
        probs, lse = fn(scores, allowed, self_mask=self_mask)
        (grad,) = torch.autograd.grad((probs * up_p).sum() + (lse * up_l).sum(), scores)
        results.append((probs, lse, grad))
    (p, lse, grad), (p_ref, lse_ref, grad_ref) = results
    assert p.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
    if allowed is not None:  # masked scores were replaced by constants: no gradient
        assert grad.masked_select(~allowed.expand_as(grad)).abs().max() == 0
    if self_mask is not None:
        assert grad.masked_select(self_mask.expand_as(grad)).abs().max() == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_lse", [False, True])
def test_dense_attend_matches_reference_fp32(kind, use_lse):
    allowed, self_mask = masks(kind)
    q, k, v = leaves()
    g = torch.Generator().manual_seed(2)
    up_o, up_l = torch.randn(*SHAPE, Q, D, generator=g), torch.randn(*SHAPE, Q, generator=g)
    results = []
    for fn in (dense_attend, reference_attend):
        out, lse = fn(q, k, v, allowed, 0.3, None, self_mask)
        loss = (out * up_o).sum() + ((lse * up_l).sum() if use_lse else 0)
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["both", "empty_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_attend_matches_reference_under_bf16_autocast(kind, dtype):
    allowed, self_mask = masks(kind)
    q, k, v = leaves(dtype)
    g = torch.Generator().manual_seed(2)
    up_o, up_l = torch.randn(*SHAPE, Q, D, generator=g), torch.randn(*SHAPE, Q, generator=g)
    results = []
    for fn in (dense_attend, reference_attend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, lse = fn(q, k, v, allowed, 0.3, None, self_mask)
            loss = (out.float() * up_o).sum() + (lse * up_l).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    (out, lse, *grads), (out_ref, lse_ref, *grads_ref) = results
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32  # softmax in fp32, matmuls in bf16
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype == dtype
        # the softmax backward is fp32 in both, then cast to bf16 (scores' dtype): at most a rounding apart
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_dropout_is_applied_to_the_probabilities_and_replayed_in_backward():
    allowed, self_mask = masks("both")
    dropout = nn.Dropout(0.5).train()
    q, k, v = leaves()
    up = torch.randn(*SHAPE, Q, D, generator=torch.Generator().manual_seed(4))
    results = []
    for fn in (dense_attend, reference_attend):
        torch.manual_seed(7)
        out, lse = fn(q, k, v, allowed, 0.3, dropout, self_mask)
        results.append((out, lse, *torch.autograd.grad((out * up).sum() + lse.sum(), (q, k, v))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the dropout did something: without it the output differs
    out_plain, _ = dense_attend(q, k, v, allowed, 0.3, None, self_mask)
    assert not torch.allclose(results[0][0], out_plain)


def saved_bytes(fn, *args, autocast: bool = False) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once), as benchmarks/longformer_cpu.py."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, lse = fn(*args)
    (out.float().sum() + lse.sum()).backward()
    return sum(saved.values())


@pytest.mark.parametrize("case", ["fp32", "fp32_dropout", "bf16_autocast", "bf16_autocast_dropout"])
def test_fewer_bytes_saved_for_backward(case):
    q_len, k_len = 64, 96  # scores dominate: (B, H, Q, K) against (B, H, Q + 2K, D) inputs
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*SHAPE, n, D, generator=g).requires_grad_() for n in (q_len, k_len, k_len))
    allowed = torch.rand(SHAPE[0], 1, q_len, k_len, generator=g) > 0.3
    dropout = nn.Dropout(0.1).train() if "dropout" in case else None
    autocast = case.startswith("bf16")
    args = (q, k, v, allowed, 0.3, dropout)
    ours, reference = saved_bytes(dense_attend, *args, autocast=autocast), saved_bytes(reference_attend, *args,
                                                                                        autocast=autocast)
    n_scores = SHAPE[0] * SHAPE[1] * q_len * k_len
    inputs = sum(t.numel() * 4 for t in (q, k, v)) * (2 if autocast else 1) + allowed.numel() * 2
    # One fp32 copy of the probabilities (plus the inputs, their bf16 copies and the masks) in every case ...
    assert ours <= 4 * n_scores + inputs, (ours, reference)
    # ... where the plain formula keeps two or three, plus the dropout mask or the bf16 copy.
    assert reference >= 8 * n_scores and ours <= reference - 4 * n_scores, (ours, reference)
