"""Longformer-style Transformer: RoBERTa's post-LayerNorm layers with sliding-window, dilated and global
self-attention (Beltagy, Peters, Cohan 2020).

The weights have the layout of RoBERTa / `transformers.LongformerModel` (see `subquadratic.convert.longformer`):
word, position (offset by the padding index) and token type embeddings, then post-LN layers
(`TransformerEncoderLayer`). Only what is specific to this model is here;
attention, feed-forward and heads are shared modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..configuration.longformer import LongformerStyleConfig
from .attention.sliding_window import GlobalTokens, SlidingWindowSelfAttention
from .base import SubquadraticPreTrainedModel, padding_mask_or_none, resolve_call
from .cache import LayerStateCache, cache_field, incoming_cache
from .heads import (
    CausalLMHead,
    MaskedLMHead,
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
)
from .layers.embeddings import lookup, plain_embedding
from .layers.layer_norm import LayerNorm
from .layers.transformer_layer import TransformerEncoderLayer

# The model's own slot in a `LayerStateCache` (no layer uses it): the running count of non-padding tokens, from
# which RoBERTa-style position ids of the next tokens follow.
POSITION_SLOT = -1


def roberta_position_ids(not_padding: torch.Tensor, padding_idx: int, count_before: torch.Tensor | int = 0):
    """RoBERTa's position ids: padding tokens get ``padding_idx``, the others ``padding_idx`` + their rank among the
    non-padding tokens (so positions start at padding_idx + 1 and left padding does not shift them).

    not_padding (B, T) bool (input_ids != pad_token_id); count_before (B, 1): non-padding tokens before these
    (cached decoding). Returns (position_ids (B, T), running count (B, T))."""
    count = not_padding.long().cumsum(dim=1) + count_before
    return count * not_padding + padding_idx, count


class LongformerStyleEmbeddings(nn.Module):
    """word + position + token type embeddings -> LayerNorm -> dropout (RoBERTa's embeddings)."""

    def __init__(self, config: LongformerStyleConfig):
        super().__init__()
        pad = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=pad)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, inputs_embeds, position_ids, token_type_ids):
        """(B, T) ids or (B, T, hidden) embeddings, (B, T) positions and token types -> (B, T, hidden)"""
        if inputs_embeds is None:
            inputs_embeds = lookup(self.word_embeddings, input_ids)
        if token_type_ids is not None or not plain_embedding(self.token_type_embeddings):
            types = self.token_type_embeddings(torch.zeros_like(position_ids) if token_type_ids is None
                                               else token_type_ids)
        else:  # every token has type 0: its row, added to all (a lookup's backward would sort T equal ids)
            types = self.token_type_embeddings.weight[0]
        embeddings = inputs_embeds + lookup(self.position_embeddings, position_ids) + types
        return self.dropout(self.layer_norm(embeddings))


def _layer(config: LongformerStyleConfig, layer_idx: int) -> TransformerEncoderLayer:
    """Translates the config into one post-LN layer (the only place that reads the config for a layer)."""
    attention = SlidingWindowSelfAttention(
        config.hidden_size, config.num_attention_heads, config.attention_window[layer_idx],
        config.attention_dilation[layer_idx], causal=config.is_decoder,
        dropout=config.attention_probs_dropout_prob, layer_idx=layer_idx)
    return TransformerEncoderLayer(attention, config.hidden_size, config.intermediate_size, config.hidden_act,
                                   config.hidden_dropout_prob, config.layer_norm_eps, config.chunk_size_feed_forward)


class LongformerStylePreTrainedModel(SubquadraticPreTrainedModel):
    config_class = LongformerStyleConfig
    every_parameter_used_by_every_batch = False  # the global projections only see batches with global tokens


class LongformerStyleModel(LongformerStylePreTrainedModel):
    """Embeddings and `config.num_hidden_layers` Longformer layers.

    Inputs of any length up to `config.max_sequence_length` work (the attention pads to whole windows internally
    and strips the padding). Global attention: `global_attention_mask` (B, T), 1 for global tokens, or the config's
    `default_global_attention` when it is not given."""

    def __init__(self, config: LongformerStyleConfig):
        super().__init__(config)
        self.embeddings = LongformerStyleEmbeddings(config)
        self.layers = nn.ModuleList(_layer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _check_shapes(self, batch, length, past, global_attention_mask):
        limit = self.config.max_sequence_length
        if past + length > limit:
            raise ValueError(f"Sequence length {past + length} is longer than this model takes: lengths 1 to {limit} "
                             f"work (max_position_embeddings={self.config.max_position_embeddings} minus "
                             f"pad_token_id + 1, as positions start after the padding index).")
        if global_attention_mask is not None and tuple(global_attention_mask.shape) != (batch, length):
            raise ValueError(f"`global_attention_mask` has shape {tuple(global_attention_mask.shape)}; expected "
                             f"{(batch, length)} (batch, new tokens), 1 for tokens with global attention.")

    def _global_mask(self, global_attention_mask, batch, length, past, device):
        """(B, T) bool or None (no global attention): the given mask, else the config's default."""
        if global_attention_mask is not None:
            return global_attention_mask.bool()
        if self.config.default_global_attention == "first_token" and past == 0:
            return first_token_global_mask((batch, length), device).bool()
        return None

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                global_attention_mask: torch.Tensor | None = None, token_type_ids: torch.LongTensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                past_key_values: LayerStateCache | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                cache: LayerStateCache | None = None, **kwargs) -> BaseModelOutputWithPast:
        """input_ids (B, T) or inputs_embeds (B, T, hidden); attention_mask (B, T_past + T), 1 for real tokens;
        global_attention_mask (B, T), 1 for tokens with global attention; token_type_ids, position_ids (B, T)
        (default: zeros, and RoBERTa's positions from the padding tokens of input_ids).

        With `use_cache` (causal models, not training) the output carries a `LayerStateCache`; passing it back as
        `cache` (or `past_key_values`) with the next tokens decodes incrementally."""
        past_key_values = incoming_cache(past_key_values, cache)
        batch, length, past, device, use_cache, output_hidden_states = resolve_call(
            self, input_ids, inputs_embeds, output_hidden_states, use_cache, past_key_values, attention_mask)
        self._check_shapes(batch, length, past, global_attention_mask)

        cache = past_key_values if past_key_values is not None else (LayerStateCache() if use_cache else None)
        count_before = 0
        if cache is not None and cache.has(POSITION_SLOT):
            count_before = cache.get(POSITION_SLOT, "count")[:, -1:]
        # padding is read from the ids; embeddings carry no padding id, so all of them count
        not_padding = (input_ids.ne(self.config.pad_token_id) if input_ids is not None
                       else torch.ones(batch, length, dtype=torch.bool, device=device))
        positions, count = roberta_position_ids(not_padding, self.config.pad_token_id, count_before)
        hidden = self.embeddings(input_ids, inputs_embeds, positions if position_ids is None else position_ids,
                                 token_type_ids)

        padding_mask = padding_mask_or_none(attention_mask)
        global_mask = self._global_mask(global_attention_mask, batch, length, past, device)
        if global_mask is not None and not past:  # where the global tokens are, found once for every layer
            global_mask = GlobalTokens(global_mask if padding_mask is None else global_mask & padding_mask,
                                       self.config.max_global_tokens)
        all_hidden = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, padding_mask=padding_mask, global_mask=global_mask, cache=cache)
            all_hidden.append(hidden)
        if cache is not None:
            cache.append(POSITION_SLOT, "count", count, seq_dim=1)
            cache.set_seq_length(past + length)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **cache_field(cache if use_cache else None),
                                       hidden_states=tuple(all_hidden) if output_hidden_states else None)


def _sequence_shape(input_ids, kwargs) -> tuple[tuple[int, int], torch.device]:
    source = input_ids if input_ids is not None else kwargs["inputs_embeds"]
    return tuple(source.shape[:2]), source.device


def first_token_global_mask(shape: tuple[int, int], device) -> torch.Tensor:
    """(B, T) long, 1 on the first token (the classification token)."""
    mask = torch.zeros(shape, dtype=torch.long, device=device)
    mask[:, 0] = 1
    return mask


def question_global_mask(input_ids: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """(B, T) long, 1 on the question: the tokens before the first ``sep_token_id`` of each row (as
    `transformers`' Longformer QA). Rows without a separator get no global tokens."""
    is_sep = input_ids == sep_token_id
    first_sep = torch.where(is_sep.any(dim=1), is_sep.int().argmax(dim=1), 0)  # (B,)
    return (torch.arange(input_ids.shape[1], device=input_ids.device) < first_sep[:, None]).long()


class LongformerStyleForMaskedLM(MaskedLMHead, LongformerStylePreTrainedModel):
    base_model_class = LongformerStyleModel


class LongformerStyleForCausalLM(CausalLMHead, LongformerStylePreTrainedModel, GenerationMixin):
    """Causal LM. `generate()` also takes a `global_attention_mask` for the prompt (generated tokens get local
    attention)."""

    base_model_class = LongformerStyleModel

    def prepare_inputs_for_generation(self, input_ids, *args, global_attention_mask=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if global_attention_mask is not None:  # only the columns of the tokens this step feeds
            new = (inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
            inputs["global_attention_mask"] = global_attention_mask[:, -new:]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, num_new_tokens: int = 1, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args,
                                                                   num_new_tokens=num_new_tokens, **kwargs)
        if (mask := model_kwargs.get("global_attention_mask")) is not None:
            model_kwargs["global_attention_mask"] = torch.cat([mask, mask.new_zeros(mask.shape[0], num_new_tokens)], 1)
        return model_kwargs


class LongformerStyleForSequenceClassification(SequenceClassificationHead, LongformerStylePreTrainedModel):
    """Sequence classification; without a `global_attention_mask` the first (classification) token is global."""

    base_model_class = LongformerStyleModel

    def forward(self, input_ids=None, attention_mask=None, labels=None, global_attention_mask=None, **kwargs):
        if global_attention_mask is None:
            global_attention_mask = first_token_global_mask(*_sequence_shape(input_ids, kwargs))
        return super().forward(input_ids, attention_mask, labels, global_attention_mask=global_attention_mask,
                               **kwargs)


class LongformerStyleForTokenClassification(TokenClassificationHead, LongformerStylePreTrainedModel):
    base_model_class = LongformerStyleModel


class LongformerStyleForQuestionAnswering(QuestionAnsweringHead, LongformerStylePreTrainedModel):
    """Extractive QA on `<s> question </s></s> context </s>`; without a `global_attention_mask` the question
    tokens (before the first `config.sep_token_id`) are global."""

    base_model_class = LongformerStyleModel

    def forward(self, input_ids=None, attention_mask=None, start_positions=None, end_positions=None,
                global_attention_mask=None, **kwargs):
        if global_attention_mask is None and input_ids is not None:
            global_attention_mask = question_global_mask(input_ids, self.config.sep_token_id)
        return super().forward(input_ids, attention_mask, start_positions, end_positions,
                               global_attention_mask=global_attention_mask, **kwargs)


AUTO_CLASSES = {
    "AutoModel": LongformerStyleModel,
    "AutoModelForMaskedLM": LongformerStyleForMaskedLM,
    "AutoModelForCausalLM": LongformerStyleForCausalLM,
    "AutoModelForSequenceClassification": LongformerStyleForSequenceClassification,
    "AutoModelForTokenClassification": LongformerStyleForTokenClassification,
    "AutoModelForQuestionAnswering": LongformerStyleForQuestionAnswering,
}
