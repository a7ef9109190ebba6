"""Position embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


class AxialPositionEmbedding(nn.Module):
    """Factorised position embeddings (Reformer, appendix; Ho et al. 2019).

    Positions form a grid of ``shape`` (for example 64 x 64 = 4096 positions); position p has the mixed-radix
    coordinates (p // 64, p % 64), and its embedding is the concatenation of one learned vector per axis,
    of widths ``dims``. Parameters: sum(shape[i] * dims[i]) instead of prod(shape) * sum(dims). Any position below
    prod(shape) can be looked up, so sequences need not fill the grid."""

    def __init__(self, shape: list[int], dims: list[int]):
        super().__init__()
        self.shape = list(shape)
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(size, dim)) for size, dim in zip(shape, dims)])
        # strides[i] = prod(shape[i+1:]): coordinate i of p is (p // strides[i]) % shape[i]
        self.strides = [math.prod(self.shape[i + 1:]) for i in range(len(self.shape))]

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (B, T) int -> (B, T, sum(dims))"""
        parts = [weight[(position_ids // stride) % size]
                 for weight, stride, size in zip(self.weights, self.strides, self.shape)]
        return torch.cat(parts, dim=-1)

