"""The merged global-key kernel (`global_keys_kernel`, Triton) against the plain formula: one softmax per query
over its window's part (as one entry with score l_w and value out_w) and the global keys outside its window.

Where these run: `triton_checks`. The module with both global kernels is compared with its readable path here
and in `test_sliding_window.py` (its GPU tests)."""

from __future__ import annotations

import math

import pytest
import torch

from subquadratic.modeling.attention import sliding_window
from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.attention.global_keys_kernel import (
    BLOCK_T,
    MAX_GLOBAL,
    kernel_available,
    merge_global_keys,
)
from subquadratic.modeling.attention.global_queries_kernel import MAX_ROWS
from subquadratic.modeling.attention.sliding_window import GlobalTokens, SlidingWindowSelfAttention
from tests.attention.triton_checks import DEVICE, needs_cuda_kernel, needs_kernel


def allowed_pairs(t, index, valid, dilation, before, after, causal):
    """(B, H, T, G) bool by the definition: the global key lies outside the query's window (and, when causal, not
    after it)."""
    offset = index[:, None, None, :] - torch.arange(t)[:, None]  # (B, 1, T, G)
    d = dilation[:, None, None]  # (H, 1, 1)
    in_window = (offset % d == 0) & (offset >= -before * d) & (offset <= after * d)
    ok = valid[:, None, None, :] & ~in_window
    return ok & (offset <= 0) if causal else ok


def plain(query, out_w, lse_w, key, value, rows, allowed, index, valid, scale):
    """One softmax over [window entry, global keys] per query, in float64; then each global token's row of
    ``rows`` at its position."""
    scores = torch.cat([lse_w[..., None], (query @ key.transpose(-1, -2)) * scale], dim=-1)
    allowed = torch.cat([torch.ones_like(allowed[..., :1]), allowed], dim=-1)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = probs[..., :1] * out_w + probs[..., 1:] @ value
    for b, g in valid.nonzero().tolist():
        out = torch.cat([out[:b], out[b:b + 1].index_copy(2, index[b, g:g + 1], rows[b:b + 1, :, g:g + 1]),
                         out[b + 1:]])
    return out


def slots_of(index, valid, t):
    slot = torch.full((index.shape[0], t), -1, dtype=torch.int32)
    for b, g in valid.nonzero().tolist():
        slot[b, index[b, g]] = g
    return slot


def case(b=2, h=3, t=2 * BLOCK_T + 11, d=32, num=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # the queries as a view with gaps (as the heads of a fused projection are)
    query = torch.randn(b, t, h, 2 * d, generator=gen)[..., :d].transpose(1, 2)
    out_w = torch.randn(b, h, t, d, generator=gen)
    key, value, rows = (torch.randn(b, h, num, d, generator=gen) for _ in range(3))
    lse_w = torch.randn(b, h, t, generator=gen) + 2.0
    index = torch.stack([torch.randperm(t, generator=gen)[:num] for _ in range(b)])
    valid = torch.ones(b, num, dtype=torch.bool)
    valid[1, num - 2:] = False  # row 1 has fewer global tokens: padded slots
    return query, out_w, lse_w, key, value, rows, index, valid


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [[1, 1, 1], [1, 3, 2]])
def test_merged_output_and_gradients_equal_the_plain_softmax(causal, dilation):
    query, out_w, lse_w, key, value, rows, index, valid = case()
    t, d = query.shape[2], query.shape[3]
    dilation = torch.tensor(dilation)
    before, after = (8, 0) if causal else (4, 4)
    scale = 1 / math.sqrt(d)
    # a global key inside some windows and outside others
    index[0, 0] = index[0, 1] + 3
    allowed = allowed_pairs(t, index, valid, dilation, before, after, causal)
    assert allowed.any() and not allowed.all()
    upstream = torch.randn(out_w.shape)
    names = ("query", "out_w", "lse_w", "key", "value", "rows")

    inputs = [x.double().requires_grad_() for x in (query, out_w, lse_w, key, value, rows)]
    expected = plain(*inputs, allowed, index, valid, scale)
    expected_grads = torch.autograd.grad(expected, inputs, upstream.double())

    inputs = [x.to(DEVICE).requires_grad_() for x in (query, out_w, lse_w, key, value, rows)]
    got = merge_global_keys(*inputs, index.to(DEVICE), valid.to(DEVICE), slots_of(index, valid, t).to(DEVICE),
                            dilation, before, after, causal, scale)
    got_grads = torch.autograd.grad(got, inputs, upstream.to(DEVICE))
    torch.testing.assert_close(got.double().cpu(), expected, atol=1e-5, rtol=1e-4)
    for name, g, e in zip(names, got_grads, expected_grads):
        torch.testing.assert_close(g.double().cpu(), e, atol=1e-4, rtol=1e-4, msg=name)
    assert not got_grads[5][1, :, valid[1].logical_not()].any()  # padded slots: no gradient


@needs_kernel
def test_no_global_keys_leave_the_window_result():
    """Rows without allowed global keys (none at all, G = 0) give the window's output, gradients through it."""
    query, out_w, lse_w, key, value, rows, index, valid = case(num=0)
    inputs = [x.to(DEVICE).requires_grad_() for x in (query, out_w, lse_w, key, value, rows)]
    slot = slots_of(index, valid, query.shape[2]).to(DEVICE)
    got = merge_global_keys(*inputs, index.to(DEVICE), valid.to(DEVICE), slot, torch.ones(3, dtype=torch.long), 4,
                            4, False, 0.2)
    torch.testing.assert_close(got, inputs[1].detach())
    grads = torch.autograd.grad(got.sum(), inputs[:3])
    assert not grads[0].any() and not grads[2].any() and (grads[1] == 1).all()


def readable_and_kernel_results(module, x, padding, glob, kernel_calls=None):
    """[outputs at real positions, input gradient, parameter gradients] of ``module``, readable path and kernel
    path (on CPU the kernels run in Triton's interpreter, made available to the module by the caller)."""
    weight = torch.randn(x.shape, device=x.device)
    results = []
    for fast in (False, True):
        module.zero_grad()
        x.grad = None
        with fast_paths(fast if DEVICE == "cuda" else (None if not fast else True)):
            out = module(x, padding_mask=padding, global_mask=glob)
        (out[padding] * weight[padding]).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()]
        results.append([out[padding].detach(), x.grad.clone()] + [g.clone() for g in grads])
    return results


def assert_same_results(results):
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def module_case(causal, t, global_at, seed=0):
    torch.manual_seed(seed)
    module = SlidingWindowSelfAttention(64, 4, 8, [1, 2, 1, 3], causal=causal).to(DEVICE)
    x = torch.randn(2, t, 64, device=DEVICE, requires_grad=True)
    padding = torch.ones(2, t, dtype=torch.bool, device=DEVICE)
    padding[0, t - 20:] = False
    glob = torch.zeros(2, t, dtype=torch.bool, device=DEVICE)
    for row, cols in enumerate(global_at):
        glob[row, cols] = True
    return module, x, padding, glob


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The module takes its kernel path on CPU too (Triton's interpreter), for float dtypes the kernels take."""
    monkeypatch.setattr(sliding_window, "kernel_available",
                        lambda tensor: tensor.dtype in (torch.float16, torch.bfloat16, torch.float32))


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_module_with_both_global_kernels_equals_readable_path(causal, kernels_on_cpu):
    """`SlidingWindowSelfAttention` with the global parts as kernels (the merged keys here, the global queries of
    `global_queries_kernel`) against its readable path: outputs and every gradient, with padding and dilation."""
    assert_same_results(readable_and_kernel_results(*module_case(causal, BLOCK_T + 70, [[0, 9], [40, 41, 100]])))


@needs_kernel
def test_module_with_more_global_rows_than_the_queries_kernel_holds(kernels_on_cpu):
    """4 heads x 17 global tokens: more rows than `MAX_ROWS`, so the global queries take the readable path while
    the keys stay in their kernel. Same results."""
    assert 4 * 17 > MAX_ROWS
    assert_same_results(readable_and_kernel_results(*module_case(False, 100, [list(range(0, 85, 5)), [3]])))


@needs_kernel
def test_module_without_global_tokens_in_a_causal_kernel_path(kernels_on_cpu):
    """An all-False global mask (no `max_global_tokens`: G = 0) on the kernel path, causal."""
    assert_same_results(readable_and_kernel_results(*module_case(True, 90, [[], []])))


@needs_kernel
@pytest.mark.parametrize("weights,inputs", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("num_global,hooked", [(2, None), (20, None), (2, "key_global"), (2, "query")],
                         ids=["folded", "more-rows-than-folded", "global-map-hooked", "projection-hooked"])
def test_kernel_path_under_autocast_with_inputs_and_weights_in_other_dtypes(weights, inputs, num_global, hooked,
                                                                           kernels_on_cpu):
    """bf16 weights with fp32 inputs under bf16 autocast (a model loaded in bf16 and trained under autocast: CUDA's
    LayerNorm gives fp32), and the reverse, through every branch of the global parts. It runs where the readable
    path runs and gives finite outputs and gradients of their shapes (Triton's interpreter multiplies bf16 wrongly,
    so the values are not compared here; on CUDA `test_sliding_window`'s GPU tests compare them)."""
    torch.manual_seed(0)
    module = SlidingWindowSelfAttention(64, 4, 8).to(weights)
    if hooked:
        getattr(module, hooked).register_forward_hook(lambda m, args, out: out)
    glob = torch.zeros(2, 100, dtype=torch.bool)
    glob[:, torch.arange(num_global) * 5] = True
    for fast in (False, True):
        x = torch.randn(2, 100, 64, dtype=inputs, requires_grad=True)
        with fast_paths(fast), torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, global_mask=glob)
        out.float().sum().backward()
        assert out.shape == x.shape and out.float().isfinite().all() and x.grad.float().isfinite().all()


@needs_kernel
def test_kernel_path_after_an_inference_mode_call_with_the_same_global_tokens(kernels_on_cpu):
    """A `GlobalTokens` that served an inference-mode call (which built its kernel slots) then serves a training
    step on the kernel path."""
    module, x, padding, glob = module_case(False, 90, [[0, 9], [40]])
    shared = GlobalTokens(glob & padding)
    with fast_paths(True if DEVICE == "cpu" else None):
        with torch.inference_mode():
            module(x.detach(), padding_mask=padding, global_mask=shared)
        out = module(x, padding_mask=padding, global_mask=shared)
    (grad,) = torch.autograd.grad(out[padding].sum(), x)
    with fast_paths(False):
        expected = module(x, padding_mask=padding, global_mask=glob)
        (expected_grad,) = torch.autograd.grad(expected[padding].sum(), x)
    torch.testing.assert_close(out[padding], expected[padding], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, expected_grad, atol=2e-5, rtol=1e-4)


def test_kernels_take_only_the_float_dtypes_they_multiply_in():
    assert not kernel_available(torch.zeros(1, dtype=torch.float64, device=DEVICE))


@needs_cuda_kernel
def test_bf16_queries_with_fp32_keys_and_the_most_global_tokens_stay_close_to_the_exact_result():
    """bf16 queries and window results with fp32 global keys, values and rows (as under autocast), and
    `MAX_GLOBAL` global tokens: within bf16's rounding of the float64 result, gradients included."""
    query, out_w, lse_w, key, value, rows, index, valid = case(num=MAX_GLOBAL, t=4 * BLOCK_T + 3, d=64)
    t = query.shape[2]
    dilation = torch.tensor([1, 2, 1])
    allowed = allowed_pairs(t, index, valid, dilation, 16, 16, False)
    upstream = torch.randn(out_w.shape)
    inputs = [x.double().requires_grad_() for x in (query, out_w, lse_w, key, value, rows)]
    expected = plain(*inputs, allowed, index, valid, 0.125)
    expected_grads = torch.autograd.grad(expected, inputs, upstream.double())
    inputs = [x.cuda().to(dtype).requires_grad_() for x, dtype in zip(
        (query, out_w, lse_w, key, value, rows), (torch.bfloat16, torch.bfloat16) + (torch.float32,) * 4)]
    got = merge_global_keys(*inputs, index.cuda(), valid.cuda(), slots_of(index, valid, t).cuda(), dilation, 16, 16,
                            False, 0.125)
    got_grads = torch.autograd.grad(got, inputs, upstream.cuda().bfloat16())
    for g, e in zip([got, *got_grads], [expected, *expected_grads]):
        error = (g.double().cpu() - e).abs().max()
        assert error <= 0.03 * e.abs().max(), (error, e.abs().max())
