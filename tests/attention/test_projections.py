"""`project`: several linear maps of one input as one product, the same numbers and gradients as calling each, and
each module called where something watches or wraps it (or the input is too short to pay for the weight copy)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subquadratic.modeling.attention.projections import project


@pytest.fixture
def linear_calls(monkeypatch):
    calls = []
    forward = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: (calls.append(self), forward(self, x))[1])
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_one_product_equals_each_map_with_gradients(bias, linear_calls):
    torch.manual_seed(0)
    linears = [nn.Linear(16, n, bias=bias) for n in (8, 8, 12)]
    x = torch.randn(2, 20, 16, requires_grad=True)  # 40 rows, 28 outputs: one product
    results = []
    for fused in (True, False):
        for m in linears:
            m.zero_grad()
        x.grad = None
        outs = project(x, linears) if fused else [m(x) for m in linears]
        if fused:
            assert not linear_calls  # no module was called
        sum((o * (i + 1)).pow(2).sum() for i, o in enumerate(outs)).backward()
        results.append([*outs, x.grad] + [p.grad for m in linears for p in m.parameters()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)


class Scaled(nn.Linear):  # a subclass with its own forward, as an adapter or a quantised layer has
    def forward(self, x):
        return 2 * super().forward(x)


def _watched(kind: str) -> nn.Linear:
    m = nn.Linear(16, 4)
    if kind == "subclass":
        m = Scaled(16, 4)
    elif kind == "forward hook":
        m.register_forward_hook(lambda module, args, output: output + 1)
    elif kind == "backward hook":
        m.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    elif kind == "instance forward":  # what accelerate's offloading does
        m.forward = lambda x, m=m: nn.functional.linear(x, m.weight, m.bias) + 1
    return m


@pytest.mark.parametrize("kind", ["subclass", "forward hook", "backward hook", "instance forward"])
def test_watched_modules_are_called(kind, linear_calls):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16)
    plain, watched = nn.Linear(16, 4), _watched(kind)
    out = project(x, [plain, watched])
    assert plain in linear_calls  # called one by one
    torch.testing.assert_close(out[1], watched(x))


def test_global_hooks_see_every_module(linear_calls):
    x = torch.randn(3, 8, 16)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: seen.append(module))
    try:
        linears = [nn.Linear(16, 4), nn.Linear(16, 4)]
        project(x, linears)
    finally:
        handle.remove()
    assert all(m in seen for m in linears)


def test_short_inputs_call_each_module(linear_calls):
    """One row per sequence (a decoding step): copying the weights would cost more than it saves."""
    linears = [nn.Linear(16, 8), nn.Linear(16, 8)]
    project(torch.randn(2, 1, 16), linears)
    assert linear_calls == linears
