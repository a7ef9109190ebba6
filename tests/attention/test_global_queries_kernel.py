"""The global queries' kernels (`global_queries_kernel`, Triton) against the plain formula: each row's softmax over
every allowed key's input (finite MASK_VALUE for padding and, when causal, later keys), times the inputs.

Where these run: `triton_checks`. The module-level comparisons with the readable path are in
`test_global_keys_kernel.py` and `test_sliding_window.py` (its GPU tests)."""

from __future__ import annotations

import pytest
import torch

from subquadratic.modeling.attention.global_queries_kernel import (
    BLOCK_N,
    FORWARD_BLOCK_N,
    MAX_ROWS,
    global_queries_attend,
    rows_beside_inputs,
)
from subquadratic.modeling.attention.masking import MASK_VALUE
from tests.attention.triton_checks import DEVICE, needs_cuda_kernel, needs_kernel


def plain(query, inputs, key_ok, positions, causal, scale):
    """(B, R, E) rows over (B, T, E) inputs, in float64; row h * G + g belongs to global token g."""
    b, rows, _ = query.shape
    t = inputs.shape[1]
    allowed = torch.ones(b, rows, t, dtype=torch.bool) if key_ok is None else key_ok[:, None, :].expand(b, rows, t)
    if causal:
        pos = positions.repeat(1, rows // positions.shape[1])  # (B, R)
        allowed = allowed & (torch.arange(t) <= pos[:, :, None])
    scores = (query @ inputs.transpose(1, 2) * scale).masked_fill(~allowed, MASK_VALUE)
    return torch.softmax(scores, dim=-1) @ inputs


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_output_and_gradients_equal_the_plain_softmax(causal, padded):
    gen = torch.Generator().manual_seed(0)
    # hidden not a multiple of the column tile; several blocks of keys in both directions, the last one partial
    b, heads, num, hidden, t = 2, 3, 5, 96, 2 * max(BLOCK_N, FORWARD_BLOCK_N) + 37
    query = torch.randn(b, heads * num, hidden, generator=gen) * 0.3
    # inputs with a batch stride that is not T * E: a slice of a wider sequence
    inputs = torch.randn(b, t + 3, hidden, generator=gen)[:, 2:t + 2]
    positions = torch.stack([torch.randperm(t, generator=gen)[:num] for _ in range(b)])
    positions[0, 0] = 0  # causal: attends to key 0 only
    key_ok = None
    if padded:
        key_ok = torch.ones(b, t, dtype=torch.bool)
        key_ok[0, t - 50:] = False
        key_ok[1, :3] = False  # row 1's causal token at position 0..2 may have no allowed key: it averages
        positions[1, 0] = 1
    scale = 0.125
    upstream = torch.randn(b, heads * num, hidden, generator=gen)

    args = [x.double().requires_grad_() for x in (query, inputs)]
    expected = plain(*args, key_ok, positions, causal, scale)
    expected_grads = torch.autograd.grad(expected, args, upstream.double())

    args = [x.to(DEVICE).requires_grad_() for x in (query, inputs)]
    got = global_queries_attend(*args, None if key_ok is None else key_ok.to(DEVICE), positions.to(DEVICE),
                                causal, scale)
    got_grads = torch.autograd.grad(got, args, upstream.to(DEVICE))
    torch.testing.assert_close(got.double().cpu(), expected, atol=1e-5, rtol=1e-4)
    for name, g, e in zip(("query", "inputs"), got_grads, expected_grads):
        torch.testing.assert_close(g.double().cpu(), e, atol=1e-4, rtol=1e-4, msg=name)


@needs_cuda_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_products_with_the_most_rows_stay_close_to_the_exact_result(causal):
    """fp32 queries and inputs (as under autocast) multiplied in bf16, with `MAX_ROWS` rows: within bf16's
    rounding of the float64 result, gradients included."""
    gen = torch.Generator().manual_seed(0)
    b, num, hidden, t = 1, MAX_ROWS // 8, 512, 3 * max(BLOCK_N, FORWARD_BLOCK_N) + 5
    query = torch.randn(b, 8 * num, hidden, generator=gen) * 0.05
    inputs = torch.randn(b, t, hidden, generator=gen)
    positions = torch.stack([torch.randperm(t, generator=gen)[:num] for _ in range(b)])
    upstream = torch.randn(b, 8 * num, hidden, generator=gen)
    args = [x.double().requires_grad_() for x in (query, inputs)]
    expected = plain(*args, None, positions, causal, 0.125)
    expected_grads = torch.autograd.grad(expected, args, upstream.double())
    args = [x.cuda().requires_grad_() for x in (query, inputs)]
    got = global_queries_attend(*args, None, positions.cuda(), causal, 0.125, torch.bfloat16)
    got_grads = torch.autograd.grad(got, args, upstream.cuda())
    for g, e in zip([got, *got_grads], [expected, *expected_grads]):
        assert g.dtype == torch.float32
        error = (g.double().cpu() - e).abs().max()
        assert error <= 0.02 * e.abs().max(), (error, e.abs().max())


@pytest.mark.parametrize("use", ["both", "rows", "inputs", "split"])
def test_rows_beside_inputs_give_the_gradients_of_a_plain_gather(use):
    """The rows' gradient is added into the inputs' (in place) and equals a plain gather's, also when only the
    rows or only the inputs are used, and when the inputs are split into parts (a fused projection's outputs),
    one of which gets no gradient."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=gen)
    positions = torch.tensor([[0, 4, 7], [8, 2, 3]])
    w_rows, w_inputs = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 9, 5, generator=gen)

    def loss(rows, inputs):
        terms = {"rows": (rows * w_rows).sum(), "inputs": (inputs * w_inputs).sum()}
        if use == "split":
            first, _, last = inputs.split([2, 1, 2], dim=-1)
            return terms["rows"] + (first * w_inputs[..., :2]).sum() + (last * w_inputs[..., 3:]).sum()
        return sum(terms.values()) if use == "both" else terms[use]

    plain = x.clone().requires_grad_()
    loss(plain.gather(1, positions[:, :, None].expand(-1, -1, 5)), plain).backward()
    fused = x.clone().requires_grad_()
    rows, inputs = rows_beside_inputs(fused, positions)
    torch.testing.assert_close(rows, plain.gather(1, positions[:, :, None].expand(-1, -1, 5)))
    loss(rows, inputs).backward()
    torch.testing.assert_close(fused.grad, plain.grad)
