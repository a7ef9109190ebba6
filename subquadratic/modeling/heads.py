"""Task heads shared by every model of the package.

A model file composes them with its own base model:

    class ReformerLMForCausalLM(CausalLMHead, ReformerLMPreTrainedModel, GenerationMixin):
        base_model_class = ReformerLMModel

(`transformers` wants `GenerationMixin` among the direct bases of a model that generates.)

The base model (attribute `model`) takes `input_ids`, `attention_mask`, `position_ids`, `inputs_embeds`,
`past_key_values` (or `cache`), `use_cache`, `output_hidden_states` and model-specific keyword arguments (passed
through), and returns a `BaseModelOutputWithPast`. Losses are `transformers`' own (`self.loss_function`), so `Trainer`'s
gradient-accumulation normalisation (`num_items_in_batch`) applies."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .cache import cache_field, output_cache
from .layers.layer_norm import LayerNorm

LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _split_loss_kwargs(kwargs: dict) -> tuple[dict, dict]:
    loss = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
    return loss, kwargs


class _HeadModel:
    """Builds the base model in `self.model`; subclasses set `base_model_class`."""

    base_model_class: type

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)

    def _base(self, input_ids, attention_mask, kwargs):
        loss_kwargs, kwargs = _split_loss_kwargs(kwargs)
        kwargs.pop("return_dict", None)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs), loss_kwargs


class CausalLMHead(_HeadModel):
    """Next-token prediction; `generate()` works, with the base model's cache for incremental decoding."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config):
        if not config.is_decoder:
            raise ValueError(f"{type(self).__name__} needs a causal model: set `is_decoder=True` in the config.")
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the base model makes its own cache (`LayerStateCache`)

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep: int = 0, **kwargs):
        """``labels`` (B, T) are the input ids themselves (shifted inside the loss); -100 is ignored."""
        outputs, loss_kwargs = self._base(input_ids, attention_mask, kwargs)
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_field(output_cache(outputs)),
                                      hidden_states=outputs.hidden_states)


class MaskedLMPredictionHead(nn.Module):
    """dense -> activation -> layer norm -> decoder (BERT/RoBERTa's MLM head)."""

    def __init__(self, hidden_size: int, vocab_size: int, activation: str, layer_norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = ACT2FN[activation]
        self.layer_norm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.activation(self.dense(hidden_states))))


class MaskedLMHead(_HeadModel):
    """Masked-token prediction over a bidirectional model."""

    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config):
        if getattr(config, "is_decoder", False):
            raise ValueError(f"{type(self).__name__} needs a bidirectional model: set `is_decoder=False` in the config.")
        super().__init__(config)
        self.lm_head = MaskedLMPredictionHead(config.hidden_size, config.vocab_size, config.hidden_act,
                                              config.layer_norm_eps)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """``labels`` (B, T): the original ids at masked positions, -100 elsewhere."""
        outputs, loss_kwargs = self._base(input_ids, attention_mask, kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class ClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> projection (RoBERTa's classification head)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


def _classifier_dropout(config) -> float:
    dropout = getattr(config, "classifier_dropout", None)
    return config.hidden_dropout_prob if dropout is None else dropout


def pool_sequence(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """The vector that summarises a sequence: the first token for bidirectional models, the last real token
    (the only one that has seen the whole input) for causal ones."""
    if not causal:
        return hidden_states[:, 0]
    if attention_mask is None:
        return hidden_states[:, -1]
    # index of the last real token; works for left and right padding
    positions = torch.arange(attention_mask.shape[1], device=hidden_states.device)
    last = (positions * attention_mask.bool()).argmax(dim=-1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


class SequenceClassificationHead(_HeadModel):
    """Sequence classification or regression (`config.num_labels`, `config.problem_type`)."""

    def __init__(self, config):
        super().__init__(config)
        self.classifier = ClassificationHead(config.hidden_size, config.num_labels, _classifier_dropout(config))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs, loss_kwargs = self._base(input_ids, attention_mask, kwargs)
        pooled = pool_sequence(outputs.last_hidden_state, attention_mask, getattr(self.config, "is_decoder", False))
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config, **loss_kwargs)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class TokenClassificationHead(_HeadModel):
    """One label per token (`config.num_labels`)."""

    def __init__(self, config):
        super().__init__(config)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs, loss_kwargs = self._base(input_ids, attention_mask, kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, config=self.config, **loss_kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class QuestionAnsweringHead(_HeadModel):
    """Extractive question answering: start and end logits per token."""

    def __init__(self, config):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, start_positions=None, end_positions=None, **kwargs):
        outputs, loss_kwargs = self._base(input_ids, attention_mask, kwargs)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(dim=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits=start_logits, end_logits=end_logits,
                                      start_positions=start_positions, end_positions=end_positions, **loss_kwargs)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states)
