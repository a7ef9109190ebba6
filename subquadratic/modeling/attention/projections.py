"""Several linear maps of the same input in one matrix product.

An attention module maps its input through query, key and value projections. Done one by one, each reads the input
again (and, under autocast, casts it to the compute dtype again), and the backward pass adds up three input
gradients; with the weights concatenated it is one product, one cast and one input gradient. The parameters stay
separate modules, so checkpoints keep their layout (RoBERTa's `query`/`key`/`value`)."""

from __future__ import annotations

import torch
from torch import nn


def _plain(module: nn.Module) -> bool:
    # Exactly nn.Linear with no hooks: a subclass or wrapper (LoRA, quantised layers) or a hook must see its call.
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def project(hidden_states: torch.Tensor, linears: list[nn.Module]) -> list[torch.Tensor]:
    """[linear(hidden_states) for linear in linears], as one product where every map is a plain `nn.Linear` with
    the same bias setting; otherwise each module is called (so that adapters and hooks apply)."""
    if len(linears) < 2 or not all(_plain(m) for m in linears) or len({m.bias is None for m in linears}) > 1:
        return [m(hidden_states) for m in linears]
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    out = nn.functional.linear(hidden_states, weight, bias)
    return list(out.split([m.out_features for m in linears], dim=-1))
