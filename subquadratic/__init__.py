"""subquadratic: efficient long-sequence Transformers as first-class Hugging Face models.

Importing the package registers every model with `AutoConfig` and the `AutoModel...` classes."""

from .configuration.reformer import ReformerLMConfig
from .modeling.auto import register_all
from .modeling.cache import LayerStateCache
from .modeling.reformer import (
    ReformerLMForCausalLM,
    ReformerLMForMaskedLM,
    ReformerLMForSequenceClassification,
    ReformerLMModel,
)

__version__ = "0.1.0"

register_all()

__all__ = [
    "LayerStateCache",
    "ReformerLMConfig",
    "ReformerLMForCausalLM",
    "ReformerLMForMaskedLM",
    "ReformerLMForSequenceClassification",
    "ReformerLMModel",
]
