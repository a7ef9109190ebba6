"""Where the tests of the Triton kernels (`hash_kernel`, `global_keys_kernel`, `global_queries_kernel`) run: on
CUDA, or on CPU through Triton's interpreter (`TRITON_INTERPRET=1` set before starting Python); skipped where
Triton is not installed (CPU-only installs, such as CI's). The interpreter multiplies bf16 wrongly, so bf16
products are checked on CUDA only (`needs_cuda_kernel`)."""

import os

import pytest
import torch

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(triton is None or not (torch.cuda.is_available() or INTERPRETED),
                                  reason="needs Triton, and CUDA or TRITON_INTERPRET=1")
needs_cuda_kernel = pytest.mark.skipif(triton is None or not torch.cuda.is_available(),
                                       reason="bf16 products need CUDA (Triton's interpreter multiplies bf16 wrongly)")
