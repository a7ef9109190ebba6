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
