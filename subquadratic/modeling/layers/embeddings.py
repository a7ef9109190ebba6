"""Embedding lookups with a short backward pass, and position embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention.flex import use_fast_path
from ..attention.projections import anything_watching


class _Lookup(torch.autograd.Function):
    """weight[ids], whose backward adds each token's gradient into its row with one `index_add_`.

    `nn.Embedding`'s CUDA backward sorts the ids to sum each row's gradients in a fixed order: on an H200 at 16K
    tokens about 20 kernels and 130 us per lookup (BENCHMARKS.md), where a zeroed table and one index_add_ (atomic
    additions, so the order of a row's sum varies from run to run) take 2. The sums run in fp32 for fp16 and bf16
    tables too (as nn.Embedding's): one rounding per token would lose the gradient of a frequent id. ``padding_idx``'s
    row gets no gradient, as in `nn.Embedding`. Not differentiable twice."""

    @staticmethod
    def forward(weight, ids, padding_idx):
        return nn.functional.embedding(ids, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, ids, padding_idx = inputs
        ctx.save_for_backward(ids)
        ctx.table, ctx.padding_idx = (weight.shape, weight.dtype), padding_idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (ids,), (shape, dtype) = ctx.saved_tensors, ctx.table
        sums = torch.promote_types(dtype, torch.float32)
        grad_weight = torch.zeros(shape, dtype=sums, device=grad.device)
        grad_weight.index_add_(0, ids.reshape(-1), grad.reshape(-1, shape[1]).to(sums))
        if ctx.padding_idx is not None:
            grad_weight[ctx.padding_idx] = 0
        return grad_weight.to(dtype), None, None


def plain_embedding(module: nn.Module) -> bool:
    """Whether calling ``module`` does no more than read rows of its weight: a plain `nn.Embedding` without hooks
    or wrappers (`anything_watching`), max_norm, frequency scaling or sparse gradients."""
    return not (anything_watching(module, nn.Embedding) or module.max_norm is not None
                or module.scale_grad_by_freq or module.sparse)


def lookup(embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``embedding(ids)``; for a `plain_embedding`, on the fast path (`flex.use_fast_path`: CUDA by default) with
    the short backward of `_Lookup`, unless deterministic algorithms are requested
    (`torch.use_deterministic_algorithms`). Any other module (position embeddings of another kind) is called."""
    if not plain_embedding(embedding):
        return embedding(ids)
    return table_rows(embedding.weight, ids, embedding.padding_idx)


def table_rows(weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """weight[ids] (ids (...) int -> (..., dim)); on the fast path without deterministic algorithms with the short
    backward of `_Lookup`, where ``padding_idx``'s row gets no gradient."""
    if torch.are_deterministic_algorithms_enabled() or not use_fast_path(ids, flex=False):
        return nn.functional.embedding(ids, weight, padding_idx)
    return _Lookup.apply(weight, ids, padding_idx)


class AxialTables(nn.Module):
    """The per-axis tables of `AxialPositionEmbedding` as parameters "0", "1", ... (the keys a `ParameterList`
    gives, so checkpoints keep `weights.0`, `weights.1`), handed out by a call: accelerate's offloading
    (`cpu_offload`, a `device_map` that offloads) brings a module's parameters to the execution device in hooks
    around its forward, and tables read from a `ParameterList`, which is never called, were still on the meta
    device. This module, which holds the parameters, is also the one `transformers` hands to `_init_weights`."""

    def __init__(self, tables: list[torch.Tensor]):
        super().__init__()
        self.count = len(tables)
        for i, table in enumerate(tables):
            self.register_parameter(str(i), nn.Parameter(table))

    def forward(self) -> list[torch.Tensor]:
        return [self[i] for i in range(self.count)]

    def __getitem__(self, i: int) -> torch.Tensor:
        """Table i, by attribute (as pruning and parametrizations, which rename the parameter, provide it)."""
        return getattr(self, str(i))

    def __len__(self) -> int:
        return self.count


class AxialPositionEmbedding(nn.Module):
    """Factorised position embeddings (Reformer, appendix; Ho et al. 2019).

    Positions form a grid of ``shape`` (for example 64 x 64 = 4096 positions); position p has the mixed-radix
    coordinates (p // 64, p % 64), and its embedding is the concatenation of one learned vector per axis,
    of widths ``dims``. Parameters: sum(shape[i] * dims[i]) instead of prod(shape) * sum(dims). Any position below
    prod(shape) can be looked up, so sequences need not fill the grid."""

    def __init__(self, shape: list[int], dims: list[int]):
        super().__init__()
        self.shape = list(shape)
        self.weights = AxialTables([torch.zeros(size, dim) for size, dim in zip(shape, dims)])
        # strides[i] = prod(shape[i+1:]): coordinate i of p is (p // strides[i]) % shape[i]
        self.strides = [math.prod(self.shape[i + 1:]) for i in range(len(self.shape))]

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (B, T) int -> (B, T, sum(dims))"""
        parts = [table_rows(weight, (position_ids // stride) % size)
                 for weight, stride, size in zip(self.weights(), self.strides, self.shape)]
        return torch.cat(parts, dim=-1)

