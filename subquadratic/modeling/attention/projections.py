"""Several linear maps of the same input in one matrix product.

An attention module maps its input through query, key and value projections. Done one by one, each reads the input
again (and, under autocast, casts it to the compute dtype again), and the backward pass adds up three input
gradients; with the weights concatenated it is one product, one cast and one input gradient. The parameters stay
separate modules, so checkpoints keep their layout (RoBERTa's `query`/`key`/`value`).

Concatenating the weights costs a copy of them per call, which pays only when the input has at least as many rows
as the maps have outputs together: a decoding step (one row per sequence) calls the maps one by one."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module


def anything_watching(m: nn.Module, plain: type = nn.Linear) -> bool:
    """Whether calling ``m`` does more than its weights say: a subclass or wrapper of ``plain`` (LoRA, quantised
    layers), a forward replaced on the instance (accelerate's offloading), or forward/backward hooks of the module
    or global ones (module trackers, FSDP units)."""
    if type(m) is not plain or "forward" in m.__dict__ or hasattr(m, "_hf_hook"):
        return True
    own = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    global_hooks = [getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")]
    return any(own) or any(global_hooks)


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products of ``x`` take: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def project(hidden_states: torch.Tensor, linears: list[nn.Module], few_rows: bool = False) -> list[torch.Tensor]:
    """[linear(hidden_states) for linear in linears], as one product where every map is a plain `nn.Linear` (no
    hooks, wrappers or offloading) with the same bias setting and the input has enough rows; otherwise each
    module is called. ``few_rows``: one product for inputs with fewer rows too, where kernel launches, not the
    weights' copy, cost the time (a training step's few global tokens: under autocast, three maps called one by
    one cast their input, weight and bias each)."""
    if not fuses(hidden_states, linears, few_rows):
        return [m(hidden_states) for m in linears]
    out = nn.functional.linear(hidden_states, *concatenated_weights(linears))
    return split_outputs(out, linears)


def fuses(hidden_states: torch.Tensor, linears: list[nn.Module], few_rows: bool = False) -> bool:
    """Whether `project` maps ``hidden_states`` through ``linears`` as one product."""
    rows = hidden_states.numel() // max(1, hidden_states.shape[-1])
    return not (len(linears) < 2 or any(anything_watching(m) for m in linears)
                or len({m.bias is None for m in linears}) > 1
                or (rows < sum(m.out_features for m in linears) and not few_rows))


def split_outputs(out: torch.Tensor, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """The product of the concatenated maps (`concatenated_weights`) -> each map's output (views)."""
    return list(out.split([m.out_features for m in linears], dim=-1))


def concatenated_weights(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the maps side by side: their outputs concatenated. The biases are all there or all
    None (None: no bias)."""
    weight = torch.cat([m.weight for m in linears])
    return weight, None if linears[0].bias is None else torch.cat([m.bias for m in linears])
