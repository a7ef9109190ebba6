"""Linformer encoder (Wang et al. 2020): BERT-style post-LN layers whose attention projects keys and values from n
to k positions, learned absolute positions, and the shared task heads.

Only what is specific to Linformer is here; the attention, the encoder layer and the heads are shared modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput

from ..configuration.linformer import LinformerConfig
from .attention.linformer import LinformerSelfAttention, SequenceProjection
from .base import SubquadraticPreTrainedModel, resolve_call
from .heads import MaskedLMHead, SequenceClassificationHead, TokenClassificationHead
from .layers.embeddings import lookup
from .layers.layer_norm import LayerNorm
from .layers.transformer_layer import TransformerEncoderLayer


def _layer(config: LinformerConfig, projected_length: int) -> TransformerEncoderLayer:
    """Translates the config into one encoder layer (the only place that reads the config for a layer)."""
    attention = LinformerSelfAttention(
        hidden_size=config.hidden_size, num_heads=config.num_attention_heads, head_size=config.attention_head_size,
        max_length=config.max_position_embeddings, projected_length=projected_length,
        sharing=config.parameter_sharing, projection_kind=config.projection_kind,
        dropout=config.attention_probs_dropout_prob, causal=config.is_decoder)
    return TransformerEncoderLayer(attention, config.hidden_size, config.intermediate_size, config.hidden_act,
                                   config.hidden_dropout_prob, config.layer_norm_eps, config.chunk_size_feed_forward)


class LinformerEmbeddings(nn.Module):
    """word + learned absolute position embeddings -> layer norm -> dropout (BERT-style, for post-LN layers)."""

    def __init__(self, config: LinformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, inputs_embeds, position_ids):
        """input_ids (B, T) or inputs_embeds (B, T, hidden); position_ids (B, T) -> (B, T, hidden)"""
        if inputs_embeds is None:
            inputs_embeds = lookup(self.word_embeddings, input_ids)
        return self.dropout(self.layer_norm(inputs_embeds + lookup(self.position_embeddings, position_ids)))


class LinformerPreTrainedModel(SubquadraticPreTrainedModel):
    config_class = LinformerConfig

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SequenceProjection) and module.weight is not None:
            init.normal_(module.weight, mean=0.0, std=module.init_std)


class LinformerModel(LinformerPreTrainedModel):
    """The Linformer encoder: embeddings and `num_hidden_layers` post-LN layers (no final norm: post-LN layers
    end with one).

    Inputs of any length from 1 to `max_position_embeddings` (n) work; the projections use their first T columns
    for an input of length T, and padded positions (`attention_mask` 0) do not affect real tokens."""

    def __init__(self, config: LinformerConfig):
        super().__init__(config)
        self.embeddings = LinformerEmbeddings(config)
        self.layers = nn.ModuleList(_layer(config, k) for k in config.projected_lengths)
        # parameter_sharing="layerwise": the one projection of the whole model, stored here once and passed to
        # every layer's attention (E = F for all layers and heads)
        self.shared_projection = None
        if config.parameter_sharing == "layerwise":
            self.shared_projection = SequenceProjection(config.projection_kind, config.max_position_embeddings,
                                                        config.projected_lengths[0])
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutput:
        """input_ids (B, T) or inputs_embeds (B, T, hidden), T <= max_position_embeddings; attention_mask (B, T),
        1 for real tokens, 0 for padding."""
        if self.config.is_decoder:
            raise ValueError("Linformer is bidirectional and cannot run causally: set `is_decoder=False`.")
        batch, length, _, device, _, output_hidden_states = resolve_call(
            self, input_ids, inputs_embeds, output_hidden_states, attention_mask=attention_mask)
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"Sequence length {length} is longer than this model takes: Linformer's projections "
                             f"are built for n = max_position_embeddings = {limit}, so lengths 1 to {limit} work.")
        if position_ids is None:
            position_ids = torch.arange(length, device=device).expand(batch, -1)
        padding_mask = None if attention_mask is None else attention_mask.bool()

        hidden = self.embeddings(input_ids, inputs_embeds, position_ids)  # (B, T, hidden)
        states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, padding_mask=padding_mask, shared_projection=self.shared_projection)
            states.append(hidden)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states) if output_hidden_states else None)


class LinformerForMaskedLM(MaskedLMHead, LinformerPreTrainedModel):
    base_model_class = LinformerModel


class LinformerForSequenceClassification(SequenceClassificationHead, LinformerPreTrainedModel):
    base_model_class = LinformerModel


class LinformerForTokenClassification(TokenClassificationHead, LinformerPreTrainedModel):
    base_model_class = LinformerModel


AUTO_CLASSES = {
    "AutoModel": LinformerModel,
    "AutoModelForMaskedLM": LinformerForMaskedLM,
    "AutoModelForSequenceClassification": LinformerForSequenceClassification,
    "AutoModelForTokenClassification": LinformerForTokenClassification,
}
