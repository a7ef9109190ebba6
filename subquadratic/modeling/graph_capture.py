"""Whether the current CUDA stream is recording a CUDA graph (`torch.cuda.graph`,
`subquadratic.training.cuda_graph`).

While a graph records, nothing may read a value back from the GPU or decide on the host from GPU data, so the
few places that do so outside a graph (skipping an all-ones padding mask, snapshotting generator states) take
their graph-safe branch."""

from __future__ import annotations

import torch


def capturing() -> bool:
    """True while the current CUDA stream records a graph (False on machines without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
