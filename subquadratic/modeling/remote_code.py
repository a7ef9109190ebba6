"""Writes the code a saved model needs into its folder, so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)

works where `subquadratic` is not installed (how hub users load it).

`transformers` loads such code from flat files that import each other as `from .name import X`. The package
is nested (configuration/, modeling/attention/, ...), so each module the model needs is copied under a flat name
(`subquadratic.modeling.attention.lsh` -> `subquadratic_modeling_attention_lsh.py`) with its package imports
rewritten to those names. Package code therefore imports concrete modules (`from ..attention.lsh import X`),
never a package's `__init__`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os

PACKAGE = "subquadratic"


def flat_name(module_name: str) -> str:
    return module_name.replace(".", "_")


def _package_imports(tree: ast.Module, module_name: str) -> list[tuple[ast.ImportFrom, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    raise ValueError(f"{module_name}: use `from ... import name` for package code, not `import {alias.name}`")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            target = importlib.util.resolve_name("." * node.level + (node.module or ""), module_name.rpartition(".")[0])
        elif (node.module or "").split(".")[0] == PACKAGE:
            target = node.module
        else:
            continue
        if node.module is None or hasattr(importlib.import_module(target), "__path__"):
            raise ValueError(f"{module_name} imports the package {target!r}; import its concrete module instead "
                             "so the code can be flattened for trust_remote_code")
        found.append((node, target))
    return found


def _rewrite(module_name: str) -> tuple[str, list[str]]:
    """Returns the flattened source of ``module_name`` and the package modules it imports."""
    source = inspect.getsource(importlib.import_module(module_name))
    lines = source.splitlines(keepends=True)
    imports = _package_imports(ast.parse(source), module_name)
    for node, target in sorted(imports, key=lambda item: -item[0].lineno):
        indent = lines[node.lineno - 1][: node.col_offset]
        new = ast.unparse(ast.ImportFrom(module=flat_name(target), names=node.names, level=1))
        lines[node.lineno - 1: node.end_lineno] = [indent + new + "\n"]
    return "".join(lines), [target for _, target in imports]


def export_remote_code(folder: str | os.PathLike, config_class: type, model_classes: dict[str, type]) -> dict:
    """Copies the modules behind ``config_class`` and ``model_classes`` (auto class name -> class) into
    ``folder`` and returns the `auto_map` that points `transformers` at them."""
    pending = [config_class.__module__, *(cls.__module__ for cls in model_classes.values())]
    written = set()
    while pending:
        module_name = pending.pop()
        if module_name in written:
            continue
        source, deps = _rewrite(module_name)
        with open(os.path.join(folder, flat_name(module_name) + ".py"), "w", encoding="utf-8") as f:
            f.write(source)
        written.add(module_name)
        pending.extend(deps)
    auto_map = {"AutoConfig": f"{flat_name(config_class.__module__)}.{config_class.__name__}"}
    for auto_name, cls in model_classes.items():
        auto_map[auto_name] = f"{flat_name(cls.__module__)}.{cls.__name__}"
    return auto_map
