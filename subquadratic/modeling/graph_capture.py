"""Whether the current CUDA stream is recording a CUDA graph (`torch.cuda.graph`,
`subquadratic.training.cuda_graph`).

While a graph records, nothing may read a value back from the GPU or decide on the host from GPU data, so the
few places that do so outside a graph (skipping an all-ones padding mask, snapshotting generator states) take
their graph-safe branch."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_PREPARING = [0]  # how many `preparing_graph` blocks are open, in any thread
_LOCK = threading.Lock()


def capturing() -> bool:
    """True while the current CUDA stream records a graph (False on machines without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def preparing_graph() -> Iterator[None]:
    """Marks the eager warm-up steps that precede a recording, and the recording: where a choice of kernels depends
    on whether a graph will launch them (`layers.layer_norm`), the warm-up compiles and runs the ones the graph
    records. Process-wide, not per thread: autograd runs CUDA backward passes, and with them the recomputation of
    checkpointed layers, on threads of its own, which must choose what the forward pass chose."""
    with _LOCK:
        _PREPARING[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _PREPARING[0] -= 1


def graph_step() -> bool:
    """Whether this step runs for a CUDA graph: while one records, or inside `preparing_graph`."""
    return _PREPARING[0] > 0 or capturing()
