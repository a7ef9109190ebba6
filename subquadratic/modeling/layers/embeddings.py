"""Position embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


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
        parts = [weight[(position_ids // stride) % size]
                 for weight, stride, size in zip(self.weights(), self.strides, self.shape)]
        return torch.cat(parts, dim=-1)

