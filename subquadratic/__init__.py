"""subquadratic: efficient long-sequence Transformers as first-class Hugging Face models.

Importing the package registers every model with `AutoConfig` and the `AutoModel...` classes."""

from .configuration.linformer import LinformerConfig
from .configuration.longformer import LongformerStyleConfig
from .configuration.reformer import ReformerLMConfig
from .modeling.auto import register_all
from .modeling.cache import LayerStateCache
from .modeling.linformer import (
    LinformerForMaskedLM,
    LinformerForSequenceClassification,
    LinformerForTokenClassification,
    LinformerModel,
)
from .modeling.longformer import (
    LongformerStyleForCausalLM,
    LongformerStyleForMaskedLM,
    LongformerStyleForQuestionAnswering,
    LongformerStyleForSequenceClassification,
    LongformerStyleForTokenClassification,
    LongformerStyleModel,
)
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
    "LinformerConfig",
    "LinformerForMaskedLM",
    "LinformerForSequenceClassification",
    "LinformerForTokenClassification",
    "LinformerModel",
    "LongformerStyleConfig",
    "LongformerStyleForCausalLM",
    "LongformerStyleForMaskedLM",
    "LongformerStyleForQuestionAnswering",
    "LongformerStyleForSequenceClassification",
    "LongformerStyleForTokenClassification",
    "LongformerStyleModel",
    "ReformerLMConfig",
    "ReformerLMForCausalLM",
    "ReformerLMForMaskedLM",
    "ReformerLMForSequenceClassification",
    "ReformerLMModel",
]
