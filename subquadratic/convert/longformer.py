"""Converts `transformers`' Longformer checkpoints, and extends RoBERTa ones, to Longformer-style models.

* `convert_longformer`: `LongformerModel` / `LongformerForMaskedLM` (an instance, a hub name or a folder) ->
  `LongformerStyleModel` / `LongformerStyleForMaskedLM` with the same outputs. The pooler of `LongformerModel` has
  no counterpart and is dropped (the task heads bring their own).
* `longformer_from_roberta`: the paper's recipe for a long model from a RoBERTa checkpoint (section 5): the 512
  learned positions are copied over and over to fill the longer table, and the global query/key/value projections
  start as copies of the local ones.

Command line (`main`):

    subquadratic-convert-longformer allenai/longformer-base-4096 ./longformer-style-base
    subquadratic-convert-longformer roberta-base ./roberta-long --from-roberta --max-length 4096
"""

from __future__ import annotations

import argparse
import os
import re

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LongformerForMaskedLM,
    LongformerModel,
    RobertaForMaskedLM,
    RobertaModel,
)

from ..configuration.longformer import LongformerStyleConfig
from ..modeling.longformer import LongformerStyleForMaskedLM, LongformerStyleModel

# Names inside one encoder layer: transformers' BERT layout -> ours (weight and bias alike).
LAYER_NAMES = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.self.query_global": "attention.query_global",
    "attention.self.key_global": "attention.key_global",
    "attention.self.value_global": "attention.value_global",
    "attention.output.dense": "attention.output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "feed_forward.dense_in",
    "output.dense": "feed_forward.dense_out",
    "output.LayerNorm": "output_norm",
}
EMBEDDING_NAMES = {"word_embeddings": "word_embeddings", "position_embeddings": "position_embeddings",
                   "token_type_embeddings": "token_type_embeddings", "LayerNorm": "layer_norm"}
# RoBERTa's MLM head maps onto the shared `MaskedLMPredictionHead`; its separate `bias` is the decoder's bias.
LM_HEAD_NAMES = {"lm_head.dense": "lm_head.dense", "lm_head.layer_norm": "lm_head.layer_norm",
                 "lm_head.decoder": "lm_head.decoder", "lm_head": "lm_head.decoder"}
DROPPED = re.compile(r"^(pooler\.|embeddings\.(position_ids|token_type_ids)$)")


def _rename(key: str, table: dict[str, str]) -> str | None:
    module, _, param = key.rpartition(".")
    return f"{table[module]}.{param}" if module in table else None


def convert_state_dict(state_dict: dict[str, torch.Tensor], base_prefix: str, with_lm_head: bool,
                       num_layers: int) -> dict[str, torch.Tensor]:
    """transformers' RoBERTa/Longformer weights (base model under ``base_prefix``, e.g. "longformer.") -> ours.

    Missing global projections (RoBERTa) are copied from the local ones. Unknown keys raise, so nothing is lost
    silently."""
    target_base = "model." if with_lm_head else ""
    out = {}
    for key, tensor in state_dict.items():
        inner = key[len(base_prefix):] if key.startswith(base_prefix) else key
        if DROPPED.match(inner):
            continue
        if (m := re.match(r"encoder\.layer\.(\d+)\.(.+)$", inner)) and (name := _rename(m[2], LAYER_NAMES)):
            out[f"{target_base}layers.{m[1]}.{name}"] = tensor
        elif inner.startswith("embeddings.") and (name := _rename(inner[len("embeddings."):], EMBEDDING_NAMES)):
            out[f"{target_base}embeddings.{name}"] = tensor
        elif with_lm_head and (name := _rename(inner, LM_HEAD_NAMES)):
            out[name] = tensor
        else:
            raise ValueError(f"Cannot convert the weight {key!r}: no Longformer-style counterpart.")
    for i in range(num_layers):
        for proj in ("query", "key", "value"):
            for param in ("weight", "bias"):
                local = f"{target_base}layers.{i}.attention.{proj}.{param}"
                out.setdefault(f"{target_base}layers.{i}.attention.{proj}_global.{param}", out[local].clone())
    return out


def _config(source_config, **fields) -> LongformerStyleConfig:
    """The Longformer-style config with the shared fields of a RoBERTa/Longformer config."""
    if source_config.hidden_act != "gelu":
        raise ValueError(f"hidden_act={source_config.hidden_act!r}: transformers' RoBERTa/Longformer MLM head always "
                         "uses gelu, the shared one uses hidden_act, so only 'gelu' converts exactly.")
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
             "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id",
             "eos_token_id", "tie_word_embeddings")
    values = {name: getattr(source_config, name) for name in names if getattr(source_config, name, None) is not None}
    values["sep_token_id"] = getattr(source_config, "sep_token_id", None) or source_config.eos_token_id
    return LongformerStyleConfig(**{**values, **fields})


def _load(source, base_class, masked_lm_class):
    """An instance as is; a hub name or folder through `from_pretrained` (with the MLM head if it has one)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    architectures = AutoConfig.from_pretrained(source).architectures or []
    with_head = any(name.endswith("ForMaskedLM") for name in architectures)
    return (masked_lm_class if with_head else base_class).from_pretrained(source)


def _build(source_model, config: LongformerStyleConfig, state_dict: dict, with_lm_head: bool):
    model = (LongformerStyleForMaskedLM if with_lm_head else LongformerStyleModel)(config)
    model.load_state_dict(state_dict, strict=True)
    return model.to(next(source_model.parameters()).dtype).eval()


def _save(model, source, output_dir, max_length: int | None = None) -> None:
    if output_dir is None:
        return
    model.save_pretrained(output_dir)
    if isinstance(source, (str, os.PathLike)):  # the tokenizer travels along where there is one
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            return
        if max_length is not None:
            tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(output_dir)


def convert_longformer(source, output_dir: str | os.PathLike | None = None):
    """`LongformerModel` or `LongformerForMaskedLM` (instance, hub name or folder) -> `LongformerStyleModel` or
    `LongformerStyleForMaskedLM` with the same weights (in eval mode), saved to ``output_dir`` if given."""
    hf = _load(source, LongformerModel, LongformerForMaskedLM)
    if not isinstance(hf, (LongformerModel, LongformerForMaskedLM)):
        raise TypeError(f"Expected a LongformerModel or LongformerForMaskedLM, got {type(hf).__name__}.")
    with_lm_head = isinstance(hf, LongformerForMaskedLM)
    window = hf.config.attention_window
    config = _config(hf.config, attention_window=list(window) if isinstance(window, (list, tuple)) else window)
    state_dict = convert_state_dict(hf.state_dict(), "longformer.", with_lm_head, config.num_hidden_layers)
    model = _build(hf, config, state_dict, with_lm_head)
    _save(model, source, output_dir)
    return model


def tile_positions(table: torch.Tensor, offset: int, rows: int) -> torch.Tensor:
    """(old_rows, hidden) position table whose first ``offset`` rows are the padding offset -> (rows, hidden):
    the offset rows kept, the learned positions repeated until the table is full."""
    learned = table[offset:]
    repeats = -(-(rows - offset) // learned.shape[0])
    return torch.cat([table[:offset], learned.repeat(repeats, 1)[: rows - offset]])


def longformer_from_roberta(source, max_length: int = 4096, attention_window: int | list[int] = 512,
                            output_dir: str | os.PathLike | None = None, **config_fields):
    """`RobertaModel` or `RobertaForMaskedLM` (instance, hub name or folder) -> a Longformer-style model taking
    ``max_length`` tokens, its positions filled with copies of the RoBERTa ones and its global projections with
    copies of the local ones (Beltagy et al., section 5), saved to ``output_dir`` if given. Other config fields
    (e.g. `attention_dilation`) can be passed as keywords."""
    hf = _load(source, RobertaModel, RobertaForMaskedLM)
    if not isinstance(hf, (RobertaModel, RobertaForMaskedLM)):
        raise TypeError(f"Expected a RobertaModel or RobertaForMaskedLM, got {type(hf).__name__}.")
    with_lm_head = isinstance(hf, RobertaForMaskedLM)
    offset = hf.config.pad_token_id + 1
    config = _config(hf.config, max_position_embeddings=max_length + offset, attention_window=attention_window,
                     **config_fields)
    state_dict = convert_state_dict(hf.state_dict(), "roberta.", with_lm_head, config.num_hidden_layers)
    key = ("model." if with_lm_head else "") + "embeddings.position_embeddings.weight"
    state_dict[key] = tile_positions(state_dict[key], offset, config.max_position_embeddings)
    model = _build(hf, config, state_dict, with_lm_head)
    _save(model, source, output_dir, max_length)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="subquadratic-convert-longformer",
        description="Convert a transformers Longformer checkpoint (or, with --from-roberta, extend a RoBERTa one) "
                    "to a Longformer-style subquadratic checkpoint.")
    parser.add_argument("source", help="hub name or folder of a LongformerModel/LongformerForMaskedLM "
                                       "(RobertaModel/RobertaForMaskedLM with --from-roberta)")
    parser.add_argument("output_dir", help="folder to write the converted checkpoint (and tokenizer) to")
    parser.add_argument("--from-roberta", action="store_true",
                        help="extend a RoBERTa checkpoint: copy its positions up to --max-length")
    parser.add_argument("--max-length", type=int, default=4096, help="with --from-roberta: longest input (4096)")
    parser.add_argument("--attention-window", type=int, default=512, help="with --from-roberta: window size (512)")
    args = parser.parse_args(argv)
    if args.from_roberta:
        model = longformer_from_roberta(args.source, args.max_length, args.attention_window, args.output_dir)
    else:
        model = convert_longformer(args.source, args.output_dir)
    print(f"Wrote {type(model).__name__} ({model.num_parameters():,} parameters) to {args.output_dir}")


if __name__ == "__main__":
    main()
