"""`project`: several linear maps of one input as one product, the same numbers and gradients as calling each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subquadratic.modeling.attention.projections import project


@pytest.mark.parametrize("bias", [True, False])
def test_one_product_equals_each_map_with_gradients(bias):
    torch.manual_seed(0)
    linears = [nn.Linear(16, n, bias=bias) for n in (8, 8, 12)]
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = []
    for fused in (True, False):
        for m in linears:
            m.zero_grad()
        x.grad = None
        outs = project(x, linears) if fused else [m(x) for m in linears]
        sum((o * (i + 1)).pow(2).sum() for i, o in enumerate(outs)).backward()
        results.append([*outs, x.grad] + [p.grad for m in linears for p in m.parameters()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)


class Scaled(nn.Linear):  # a subclass with its own forward, as an adapter or a quantised layer has
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclasses_and_hooks_are_called():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    plain, scaled = nn.Linear(16, 4), Scaled(16, 4)
    out = project(x, [plain, scaled])
    torch.testing.assert_close(out[1], scaled(x))
    hooked = nn.Linear(16, 4)
    hooked.register_forward_hook(lambda module, args, output: output + 1)
    torch.testing.assert_close(project(x, [plain, hooked])[1], nn.functional.linear(x, hooked.weight, hooked.bias) + 1)
