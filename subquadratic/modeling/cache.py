"""Per-layer state for incremental decoding, for attention whose state is more than keys and values.

Each attention module stores named tensors under its layer index (keys, values, and for LSH attention the hash
buckets), each with its own sequence axis. `generate()` receives this object as the model's cache.

`transformers` 5.24 renamed the decoding cache from `past_key_values` to `cache`, in model inputs (what
`generate()` passes) and in model outputs; earlier releases use the old name. The models take either name and
answer under the installed release's field name (`OUTPUT_CACHE_FIELD`)."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def incoming_cache(past_key_values, cache):
    """The cache a forward call was given, under either name."""
    if past_key_values is not None and cache is not None:
        raise ValueError("Pass the decoding cache once: as `cache` (transformers >= 5.24) or as `past_key_values`, "
                         "not both.")
    return cache if cache is not None else past_key_values


def output_cache(outputs):
    """The cache a model output carries, whatever this release calls the field."""
    return getattr(outputs, OUTPUT_CACHE_FIELD)


def cache_field(cache) -> dict:
    """Keyword argument that puts ``cache`` into a `transformers` output class."""
    return {OUTPUT_CACHE_FIELD: cache}


class LayerStateCache:
    def __init__(self):
        self._states: dict[int, dict[str, tuple[torch.Tensor, int]]] = {}
        self._seq_length = 0

    def has(self, layer_idx: int) -> bool:
        return layer_idx in self._states

    def append(self, layer_idx: int, name: str, tensor: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Appends ``tensor`` along ``seq_dim`` to the stored one and returns the whole."""
        layer = self._states.setdefault(layer_idx, {})
        if name in layer:
            tensor = torch.cat([layer[name][0], tensor], dim=seq_dim)
        layer[name] = (tensor, seq_dim)
        return tensor

    def get(self, layer_idx: int, name: str) -> torch.Tensor:
        return self._states[layer_idx][name][0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seq_length

    def set_seq_length(self, length: int) -> None:
        """Called by the model after each forward pass; trims states stored for internal padding."""
        for layer in self._states.values():
            for name, (tensor, dim) in layer.items():
                layer[name] = (tensor.narrow(dim, 0, length), dim)
        self._seq_length = length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Selects batch rows (beam search)."""
        for layer in self._states.values():
            for name, (tensor, dim) in layer.items():
                layer[name] = (tensor.index_select(0, beam_idx.to(tensor.device)), dim)

    def __len__(self) -> int:
        return len(self._states)
