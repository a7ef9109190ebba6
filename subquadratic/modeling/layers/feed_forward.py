"""Position-wise feed-forward layer, optionally applied to a few positions at a time (Reformer, section 3)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class ChunkedFeedForward(nn.Module):
    """dense -> activation -> dense -> dropout, over ``chunk_size`` positions at a time (0: all at once).

    Chunking bounds the (B, T, intermediate_size) activation to (B, chunk_size, intermediate_size) at the same
    result, which matters for long sequences where the feed-forward activation dwarfs the residual stream."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "gelu", dropout: float = 0.0,
                 chunk_size: int = 0):
        super().__init__()
        self.dense_in = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[activation]
        self.dense_out = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.chunk_size = chunk_size

    def position_wise(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense_out(self.activation(self.dense_in(x))))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, hidden)"""
        if self.chunk_size <= 0 or hidden_states.shape[1] <= self.chunk_size:
            return self.position_wise(hidden_states)
        chunks = hidden_states.split(self.chunk_size, dim=1)
        return torch.cat([self.position_wise(chunk) for chunk in chunks], dim=1)
