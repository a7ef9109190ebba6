"""Checks shared by the tests of the attention modules' fast paths (FlexAttention on CUDA) against their readable
paths: a spy that proves the fast path ran, and the comparisons of outputs and gradients."""

import pytest
import torch

from subquadratic.modeling.attention.flex import fast_paths

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention kernels need CUDA")


def record_flex_calls(monkeypatch, module) -> list:
    """Replaces ``module.flex_attention`` with a spy that records the query shape of each call, so that a
    comparison of the two paths cannot pass without the fast one."""
    calls = []
    original = module.flex_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "flex_attention", spy)
    return calls


def readable_and_fast(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` without gradients, on the readable path and then with the fast path forced."""
    with torch.no_grad():
        with fast_paths(False):
            readable = fn(*args, **kwargs)
        with fast_paths(True):
            fast = fn(*args, **kwargs)
    return readable, fast


def assert_dropout_and_cpu_backward_stay_readable(module, x, flex_calls: list, **kwargs) -> None:
    """Even with fast paths forced, attention dropout while training and gradients on CPU (FlexAttention has no
    CPU backward) run the readable path. Leaves ``module`` training with dropout 0."""
    with fast_paths(True):
        with torch.no_grad():
            module(x, **kwargs)
        assert not flex_calls
        module.dropout.p = 0.0
        module(x.requires_grad_(True), **kwargs).sum().backward()
        assert not flex_calls


def assert_fp32_match(got: list, expected: list) -> None:
    """[output, gradients...] of the fast path against the readable path's, in fp32."""
    torch.testing.assert_close(got[0], expected[0], atol=5e-5, rtol=1e-4)
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=1e-3)


def assert_bf16_as_accurate(fast: list, readable: list, reference: list) -> None:
    """Under bf16 autocast both paths round differently: the fast path must be about as close to the fp32
    ``reference`` as the readable path is."""
    for f, r, ref in zip(fast, readable, reference):
        assert torch.isfinite(f).all()
        allowed = 2 * (r - ref).abs().max() + 1e-3 * ref.abs().max()
        assert (f - ref).abs().max() <= allowed, ((f - ref).abs().max(), allowed)


def assert_compiled_fast_path_matches(module, x, padding, flex_calls, real_only: bool = False) -> None:
    """torch.compile of the whole module (fullgraph): FlexAttention then runs inside the compiled region, and a
    second call takes the block mask from the cache. ``real_only``: compare non-padding positions only."""
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    with torch.no_grad():
        with fast_paths(False):
            expected = module(x, padding_mask=padding)
        with fast_paths(True):
            got = compiled(x, padding_mask=padding)
            again = compiled(x, padding_mask=padding)  # now with the cached block mask
    assert flex_calls
    torch.testing.assert_close(again, got)
    keep = padding if real_only else slice(None)
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- on CUDA
def gpu_runner(module, t: int, hidden: int, padded: bool = True, **call_kwargs):
    """run(fast, bf16) -> [outputs at real positions, gradient of the input, gradient of every parameter] of
    ``module`` on an input (2, t, hidden) whose row 0 is padding from position 250 (``padded``; else no padding
    mask is passed), with the fast path forced (``fast``) or the readable one. The loss weighs every real output
    differently and ignores padding queries, whose outputs may differ between the paths."""
    x = torch.randn(2, t, hidden, device="cuda", requires_grad=True)
    padding = torch.ones(2, t, dtype=torch.bool, device="cuda")
    if padded:
        padding[0, 250:] = False
    weight = torch.randn(2, t, hidden, device="cuda")

    def run(fast: bool, bf16: bool) -> list:
        module.zero_grad()
        x.grad = None
        with fast_paths(fast), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out = module(x, padding_mask=padding if padded else None, **call_kwargs)
        (out.float()[padding] * weight[padding]).sum().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]
        return [out.float()[padding], x.grad.clone()] + grads  # unused parameters (no global tokens): zeros

    return run


def check_gpu_fp32(run, flex_calls: list, calls: int) -> None:
    expected = run(fast=False, bf16=False)
    assert not flex_calls
    got = run(fast=True, bf16=False)
    assert len(flex_calls) == calls
    assert_fp32_match(got, expected)


def check_gpu_bf16(run, flex_calls: list, calls: int) -> None:
    reference = run(fast=False, bf16=False)
    readable = run(fast=False, bf16=True)
    fast = run(fast=True, bf16=True)
    assert len(flex_calls) == calls
    assert_bf16_as_accurate(fast, readable, reference)


def check_gpu_compiled(module, run, flex_calls: list) -> None:
    """torch.compile of the module's forward (inductor): FlexAttention runs inside the compiled region; the block
    mask is built there on the first call (use a length no other test uses) and taken from the cache on the second."""
    expected = run(fast=False, bf16=False)
    module.forward = torch.compile(module.forward)
    for _ in range(2):
        assert_fp32_match(run(fast=True, bf16=False), expected)
    assert flex_calls
