"""Discrete choices a layer makes in its forward pass, kept for the recomputation of that pass in the backward
pass.

The reversible stack (`layers.reversible`) recomputes each block in the backward pass from inputs it rebuilds by
subtraction, which equal the original inputs only up to rounding. A discrete choice computed from them (an LSH
bucket) could then come out differently near a tie, and the gradient would be that of another function. A layer
wraps such a computation in `remembered`: while the stack runs its forward pass the result is computed and kept;
while the stack recomputes the block, the kept results are handed back in the same order (and the work is
skipped). Anywhere else `remembered` just computes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_STATE = threading.local()


@contextlib.contextmanager
def _mode(store: list, replay: bool) -> Iterator[None]:
    previous = getattr(_STATE, "mode", None)
    _STATE.mode = (store, replay, [0])
    try:
        yield
    finally:
        _STATE.mode = previous


def recording(store: list):
    """Within: `remembered` computes and appends each result to ``store``."""
    return _mode(store, replay=False)


def replaying(store: list):
    """Within: `remembered` returns the results of ``store`` in order instead of computing them."""
    return _mode(store, replay=True)


def remembered(compute: Callable[[], T]) -> T:
    """``compute()``, kept while recording and taken from the record while replaying (see the module docstring).
    ``compute`` must not depend on random numbers that later computations of the block rely on being drawn."""
    mode = getattr(_STATE, "mode", None)
    if mode is None:
        return compute()
    store, replay, position = mode
    if not replay:
        value = compute()
        store.append(value)
        return value
    if position[0] >= len(store):
        raise RuntimeError("the recomputation in the backward pass asked for more remembered values than the "
                           "forward pass made: the block must take the same path both times")
    position[0] += 1
    return store[position[0] - 1]
