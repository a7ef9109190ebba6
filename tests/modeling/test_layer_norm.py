"""`layers.layer_norm.LayerNorm`: its Triton kernels (on CUDA, or on CPU through Triton's interpreter) against
`nn.LayerNorm`, and where it keeps `nn.LayerNorm`'s own forward."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from subquadratic.modeling.attention.flex import fast_paths
from subquadratic.modeling.graph_capture import graph_step, preparing_graph
from subquadratic.modeling.layers import layer_norm as layer_norm_module
from subquadratic.modeling.layers.layer_norm import LayerNorm, fast_layer_norm_runs
from tests.attention.triton_checks import DEVICE, INTERPRETED, needs_cuda_kernel, needs_kernel


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The kernels on CPU too (Triton's interpreter), and for the small inputs of these tests."""
    monkeypatch.setattr(layer_norm_module, "EAGER_MIN_ELEMENTS", 0)
    if INTERPRETED:
        monkeypatch.setattr(layer_norm_module, "kernel_available", lambda x: True)


def _norms(width):
    torch.manual_seed(0)
    fast = LayerNorm(width, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        fast.weight.normal_()
        fast.bias.normal_()
    plain = nn.LayerNorm(width, eps=1e-5).to(DEVICE)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _results(norm, x, upstream, autocast=None):
    x = x.clone().requires_grad_()
    norm.zero_grad()
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = norm(x)
    (out.float() * upstream).sum().backward()
    return out, x.grad, norm.weight.grad.clone(), norm.bias.grad.clone()


@needs_kernel
# rows not a multiple of 4, widths not powers of 2, and one wide enough for tiles of one row
@pytest.mark.parametrize("shape", [(2, 37, 48), (3, 5, 100), (130, 16), (9, 3000)])
def test_kernels_equal_nn_layer_norm(shape, kernels_on_cpu):
    fast, plain = _norms(shape[-1])
    x = torch.randn(shape, device=DEVICE) * 3 + 1
    upstream = torch.randn(shape, device=DEVICE)
    with fast_paths(True):
        assert fast_layer_norm_runs(x, fast)
        got = _results(fast, x, upstream)
    assert type(got[0].grad_fn).__name__ != "NativeLayerNormBackward0"  # the kernels ran
    expected = _results(plain, x, upstream)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_cuda_kernel
def test_kernels_under_autocast_take_bf16_inputs_and_return_fp32(kernels_on_cpu):
    fast, plain = _norms(512)
    x = torch.randn(3, 257, 512, device="cuda").bfloat16()
    upstream = torch.randn(3, 257, 512, device="cuda")
    with fast_paths(True):
        got = _results(fast, x, upstream, autocast=torch.bfloat16)
    expected = _results(plain, x, upstream, autocast=torch.bfloat16)
    assert got[0].dtype == expected[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_readable_path_where_the_kernels_do_not_apply():
    norm = LayerNorm(8)
    x = torch.randn(2, 8)
    with fast_paths(False):
        assert not fast_layer_norm_runs(x, norm)
    with fast_paths(True):
        assert not fast_layer_norm_runs(x.double(), norm)  # another dtype, no autocast
        assert not fast_layer_norm_runs(x, LayerNorm(8, elementwise_affine=False))
        assert not fast_layer_norm_runs(torch.randn(2, 9000), LayerNorm(9000))
        small, on_device = x.to(DEVICE), LayerNorm(8).to(DEVICE)
        assert not fast_layer_norm_runs(small, on_device)  # few elements, and no graph to record
        with preparing_graph():  # the warm-up of a recording, as the recording: the kernels where they can run
            assert fast_layer_norm_runs(small, on_device) == layer_norm_module.kernel_available(small)
            # in every thread: autograd's backward threads recompute checkpointed layers
            seen = []
            worker = threading.Thread(target=lambda: seen.append(graph_step()))
            worker.start()
            worker.join()
            assert seen == [True]
        assert not graph_step()
        out = norm(x)  # on CPU: nn.LayerNorm's forward
    assert type(out.grad_fn).__name__ == "NativeLayerNormBackward0"
    torch.testing.assert_close(out, nn.functional.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps))
