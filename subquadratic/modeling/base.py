"""What every `subquadratic` model shares: weight initialisation, internal padding to whole chunks, and saving
with the code for `trust_remote_code`."""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .attention.lsh import LSHSelfAttention
from .graph_capture import capturing
from .layers.embeddings import AxialTables
from .remote_code import PACKAGE, export_remote_code


class SubquadraticPreTrainedModel(PreTrainedModel):
    """Base of every model of the package. Subclasses set `config_class`; the base model of each head lives in
    the attribute `model` (`base_model_prefix`)."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Whether every training batch gives every trainable parameter a gradient. Where it does not, DDP must look for
    # unused parameters each step (`find_unused_parameters`), which the training loop turns on from this.
    every_parameter_used_by_every_batch = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, AxialTables):
            for weight in module():
                init.normal_(weight, mean=0.0, std=std)
        elif isinstance(module, LSHSelfAttention):
            init.copy_(module.fixed_rotations, module.seeded_rotations())

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the model's code and `auto_map`, so the folder also loads with
        `trust_remote_code=True` where `subquadratic` is not installed."""
        if type(self).__module__.split(".")[0] == PACKAGE:
            os.makedirs(save_directory, exist_ok=True)
            auto_classes = sys.modules[type(self).__module__].AUTO_CLASSES
            self.config.auto_map = export_remote_code(save_directory, type(self.config), auto_classes)
        return super().save_pretrained(save_directory, *args, **kwargs)


def pad_to_multiple(hidden_states: torch.Tensor, padding_mask: torch.Tensor | None, multiple: int):
    """Pads (B, T, hidden) on the right to a multiple of ``multiple``. Returns the padded states and a (B, T')
    bool mask that is False on the added positions (None when nothing was masked or added)."""
    length = hidden_states.shape[1]
    extra = (-length) % multiple
    if extra == 0:
        return hidden_states, None if padding_mask is None else padding_mask.bool()
    hidden_states = nn.functional.pad(hidden_states, (0, 0, 0, extra))
    if padding_mask is None:
        padding_mask = torch.ones(hidden_states.shape[0], length, dtype=torch.bool, device=hidden_states.device)
    return hidden_states, nn.functional.pad(padding_mask.bool(), (0, extra), value=False)


def padding_mask_or_none(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) bool padding mask of an ``attention_mask``, or None where it marks every token real, so that the
    attention runs the kernels of unpadded input (a data collator passes an all-ones mask with unpadded batches).
    Finding that out reads one value back from the device, once per forward; inside torch.compile and while
    `torch.jit.trace` records, the mask is kept instead (a traced or compiled graph must not bake in the answer for
    the example input), and so it is while a CUDA graph records (which cannot read values back)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not capturing() and bool(mask.all()):
        return None
    return mask


class CallShape(NamedTuple):
    batch: int
    length: int  # new tokens of this call
    past: int  # tokens already in the cache
    device: torch.device
    use_cache: bool
    output_hidden_states: bool


def resolve_call(model: PreTrainedModel, input_ids, inputs_embeds, output_hidden_states=None, use_cache=None,
                 past_key_values=None, attention_mask=None) -> CallShape:
    """What every base model's forward settles first: exactly one of ids and embeddings, an attention mask that
    covers the cached and the new tokens, the config's defaults, and a cache only for causal models outside
    training."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
    config = model.config
    source = input_ids if input_ids is not None else inputs_embeds
    batch, length = source.shape[:2]
    past = 0 if past_key_values is None else past_key_values.get_seq_length()
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
        raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected "
                         f"{(batch, past + length)} (batch, cached + new tokens).")
    use_cache = getattr(config, "use_cache", False) if use_cache is None else use_cache
    return CallShape(
        batch=batch, length=length, past=past, device=source.device,
        use_cache=bool(use_cache and getattr(config, "is_decoder", False) and not model.training),
        output_hidden_states=config.output_hidden_states if output_hidden_states is None else output_hidden_states)
