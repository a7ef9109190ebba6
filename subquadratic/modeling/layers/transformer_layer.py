"""A BERT-style (post-LN) encoder layer around any self-attention module.

    h   = LayerNorm(x + dropout(attention(x, **attention_kwargs)))
    out = LayerNorm(h + feed_forward(h))

Post-LN as in BERT and RoBERTa (the models Linformer and Longformer start from); the embeddings feeding the first
layer are layer-normed too. The attention module maps (B, T, hidden) to (B, T, hidden) and takes whatever
keyword arguments its mechanism needs (padding mask, ...), which `forward` passes through untouched."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .feed_forward import ChunkedFeedForward
from .layer_norm import LayerNorm


class TransformerEncoderLayer(GradientCheckpointingLayer):
    """attention + feed-forward residual sub-layers, each followed by a layer norm.

    A `GradientCheckpointingLayer`, so `model.activation_checkpointing_enable()` (before transformers 5.23:
    `gradient_checkpointing_enable()`) recomputes it in the backward pass.

    Args:
        attention: the self-attention module, ``attention(hidden_states, **attention_kwargs) -> hidden_states``.
        hidden_size: width of the residual stream.
        intermediate_size, activation, chunk_size: the `ChunkedFeedForward` settings.
        dropout: dropout on both sub-layer outputs (the feed-forward applies its own).
        layer_norm_eps: epsilon of the layer norms.
    """

    def __init__(self, attention: nn.Module, hidden_size: int, intermediate_size: int, activation: str = "gelu",
                 dropout: float = 0.0, layer_norm_eps: float = 1e-12, chunk_size: int = 0):
        super().__init__()
        self.attention = attention
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_norm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.feed_forward = ChunkedFeedForward(hidden_size, intermediate_size, activation, dropout, chunk_size)
        self.output_norm = LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, hidden)"""
        attended = self.attention(hidden_states, **attention_kwargs)
        hidden_states = self.attention_norm(hidden_states + self.attention_dropout(attended))
        return self.output_norm(hidden_states + self.feed_forward(hidden_states))
