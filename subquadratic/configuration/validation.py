"""Small checks shared by every configuration: each raises a ``ValueError`` naming the field and what it takes."""

from __future__ import annotations


def require(condition: bool, field: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"`{field}`={value!r} is not valid: {allowed}.")


def positive_int(field: str, value) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value, "expected an integer > 0")


def non_negative_int(field: str, value) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field, value, "expected an integer >= 0")


def probability(field: str, value) -> None:
    require(isinstance(value, (int, float)) and 0.0 <= value < 1.0, field, value, "expected a probability in [0, 1)")


def one_of(field: str, value, choices) -> None:
    require(value in choices, field, value, f"expected one of {sorted(choices)}")


def per_layer(field: str, value, num_layers: int, check) -> list:
    """Expands ``value`` (one value, or a list with one per layer) to a list of ``num_layers`` checked values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_layers
    require(len(values) == num_layers, field, value, f"expected one value or a list of {num_layers} (one per layer)")
    for i, v in enumerate(values):
        check(f"{field}[{i}]", v)
    return values
