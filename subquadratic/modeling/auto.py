"""Registers every model of the package with the `transformers` Auto classes (run on `import subquadratic`).

The `model_type` names belong to the package (`reformer_lm`, ...), so they never replace a built-in model."""

from __future__ import annotations

import transformers
from transformers import AutoConfig

from . import linformer, longformer, reformer

MODEL_MODULES = [reformer, linformer, longformer]
CONFIG_CLASSES = {reformer: reformer.ReformerLMConfig, linformer: linformer.LinformerConfig,
                  longformer: longformer.LongformerStyleConfig}


def register_all() -> None:
    for module in MODEL_MODULES:
        config_class = CONFIG_CLASSES[module]
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_class in module.AUTO_CLASSES.items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)


def known_model_types() -> list[str]:
    """The `model_type` names this package registers."""
    return sorted(cls.model_type for cls in CONFIG_CLASSES.values())


def has_head(config_class: type, auto_name: str) -> bool:
    """Whether this package registers a model of ``config_class`` with the Auto class named ``auto_name``."""
    return any(CONFIG_CLASSES[module] is config_class and auto_name in module.AUTO_CLASSES
               for module in MODEL_MODULES)
