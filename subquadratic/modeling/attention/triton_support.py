"""What the Triton kernels (`hash_kernel`, `global_keys_kernel`, `global_queries_kernel`) share: Triton itself, or
None on installs without it (CPU-only builds of PyTorch; the readable paths run there), and where to launch."""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only installs have no Triton
    triton = None


def launch_device(tensor: torch.Tensor):
    """Where to launch kernels on ``tensor``: Triton launches on the current device (CPU tensors: Triton's
    interpreter, for tests)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
