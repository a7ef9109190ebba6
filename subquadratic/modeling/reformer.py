"""Reformer-LM: reversible layers alternating LSH and local attention, chunked feed-forward, axial positions.

Only what is specific to the Reformer is here; attention, layers and heads are shared modules."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..configuration.reformer import ReformerLMConfig
from .attention.local import LocalSelfAttention
from .attention.lsh import LSHSelfAttention
from .base import SubquadraticPreTrainedModel, pad_to_multiple, resolve_call
from .cache import LayerStateCache, cache_field, incoming_cache
from .heads import CausalLMHead, MaskedLMHead, SequenceClassificationHead
from .layers.embeddings import AxialPositionEmbedding, lookup
from .layers.feed_forward import ChunkedFeedForward
from .layers.layer_norm import LayerNorm
from .layers.reversible import ReversibleStack


class PreNorm(nn.Module):
    """x -> dropout(sublayer(LayerNorm(x))): one half of a reversible block."""

    def __init__(self, hidden_size: int, eps: float, sublayer: nn.Module, dropout: float):
        super().__init__()
        self.layer_norm = LayerNorm(hidden_size, eps=eps)
        self.sublayer = sublayer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.dropout(self.sublayer(self.layer_norm(x), **kwargs))


def _attention(config: ReformerLMConfig, kind: str, layer_idx: int) -> nn.Module:
    """Translates the config into one layer's attention module (the only place that reads the config)."""
    common = dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                  head_size=config.attention_head_size, causal=config.is_decoder,
                  dropout=config.attention_probs_dropout_prob, layer_idx=layer_idx)
    if kind == "lsh":
        return LSHSelfAttention(chunk_length=config.lsh_chunk_length, num_buckets=config.resolved_num_buckets,
                                num_hashes=config.num_hashes, hash_seed=config.hash_seed, **common)
    return LocalSelfAttention(chunk_length=config.local_chunk_length, chunks_before=config.local_num_chunks_before,
                              chunks_after=config.local_num_chunks_after, **common)


class ReformerLMEmbeddings(nn.Module):
    def __init__(self, config: ReformerLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.axial_pos_embds:
            self.position_embeddings = AxialPositionEmbedding(config.axial_pos_shape, config.axial_pos_embds_dim)
        else:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, inputs_embeds, position_ids):
        if inputs_embeds is None:
            inputs_embeds = lookup(self.word_embeddings, input_ids)
        return self.dropout(inputs_embeds + lookup(self.position_embeddings, position_ids))


class ReformerLMPreTrainedModel(SubquadraticPreTrainedModel):
    config_class = ReformerLMConfig


class ReformerLMModel(ReformerLMPreTrainedModel):
    """The Reformer stack: embeddings, reversible layers (`config.attn_layers`), final layer norm.

    Inputs of any length up to `config.max_position_embeddings` work: they are padded internally to a whole
    number of chunks (the padding is masked and stripped from the outputs)."""

    def __init__(self, config: ReformerLMConfig):
        super().__init__(config)
        self.embeddings = ReformerLMEmbeddings(config)
        attention = [PreNorm(config.hidden_size, config.layer_norm_eps, _attention(config, kind, i),
                             config.hidden_dropout_prob) for i, kind in enumerate(config.attn_layers)]
        feed_forward = [PreNorm(config.hidden_size, config.layer_norm_eps,
                                ChunkedFeedForward(config.hidden_size, config.intermediate_size, config.hidden_act,
                                                   config.hidden_dropout_prob, config.chunk_size_feed_forward),
                                0.0) for _ in config.attn_layers]
        self.layers = ReversibleStack(attention, feed_forward, reversible=config.reversible)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        chunks = [config.lsh_chunk_length if kind == "lsh" else config.local_chunk_length for kind in config.attn_layers]
        self.pad_multiple = math.lcm(*chunks)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                past_key_values: LayerStateCache | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                cache: LayerStateCache | None = None, **kwargs) -> BaseModelOutputWithPast:
        """input_ids (B, T) or inputs_embeds (B, T, hidden); attention_mask (B, T_past + T), 1 for real tokens.

        With `use_cache` (causal models, not training) the output carries a `LayerStateCache`; passing it back as
        `cache` (or `past_key_values`) with the next tokens decodes incrementally."""
        past_key_values = incoming_cache(past_key_values, cache)
        batch, length, past, device, use_cache, output_hidden_states = resolve_call(
            self, input_ids, inputs_embeds, output_hidden_states, use_cache, past_key_values, attention_mask)
        limit = self.config.max_position_embeddings
        if past + length > limit:
            raise ValueError(f"Sequence length {past + length} is longer than this model takes: lengths 1 to "
                             f"max_position_embeddings={limit} work (any length, not only multiples of the chunk "
                             "length).")
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device).expand(batch, -1)
        hidden = self.embeddings(input_ids, inputs_embeds, position_ids)

        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else LayerStateCache()
        if past:  # incremental decoding: no padding, attention reads the cache
            padding_mask = None if attention_mask is None else attention_mask.bool()
        else:
            hidden, padding_mask = pad_to_multiple(hidden, attention_mask, self.pad_multiple)
        y1, y2, states = self.layers(hidden, hidden, {"padding_mask": padding_mask, "cache": cache},
                                     output_hidden_states)
        out = self.final_layer_norm((y1 + y2) / 2)[:, :length]
        if cache is not None:
            cache.set_seq_length(past + length)
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(h[:, :length] for h in [hidden, *states[:-1]]) + (out,)
        return BaseModelOutputWithPast(last_hidden_state=out, **cache_field(cache), hidden_states=hidden_states)


class ReformerLMForCausalLM(CausalLMHead, ReformerLMPreTrainedModel, GenerationMixin):
    base_model_class = ReformerLMModel


class ReformerLMForMaskedLM(MaskedLMHead, ReformerLMPreTrainedModel):
    base_model_class = ReformerLMModel


class ReformerLMForSequenceClassification(SequenceClassificationHead, ReformerLMPreTrainedModel):
    base_model_class = ReformerLMModel


AUTO_CLASSES = {
    "AutoModel": ReformerLMModel,
    "AutoModelForCausalLM": ReformerLMForCausalLM,
    "AutoModelForMaskedLM": ReformerLMForMaskedLM,
    "AutoModelForSequenceClassification": ReformerLMForSequenceClassification,
}
