"""LayerNorm whose forward and backward passes are Triton kernels on CUDA.

On an H200 with torch 2.11, `nn.LayerNorm` over (16384, 512) fp32 rows took 40 us forward and 104 us backward
(its weight and bias gradients alone 77 us), at a third of the memory bandwidth or less: 2 ms of a 16 ms
Longformer-style training step with its 14 layer norms (BENCHMARKS.md). Here the forward pass normalises a few
rows per program; the backward pass gives each program a run of rows, whose input gradients it
writes and whose weight and bias gradients it sums in registers, then one sum over the programs' partial sums.

`LayerNorm` is an `nn.LayerNorm` (same parameters, checkpoints and initialisation) that takes these kernels where
they apply (`fast_layer_norm_runs`) and `nn.LayerNorm`'s own forward elsewhere: the readable path, which CPU runs
and the tests compare the kernels with (on CPU through Triton's interpreter)."""

from __future__ import annotations

import torch
from torch import nn

from ..attention.flex import use_fast_path
from ..attention.triton_support import launch_device, triton
from ..graph_capture import graph_step

if triton is not None:
    import triton.language as tl

ROWS = 4  # rows per tile of both kernels, for rows of up to 1024 (wider ones: fewer, see `_tile`)
MAX_WIDTH = 8192  # widest rows the kernels take (a whole row sits in registers)
# Outside a CUDA graph's recording, inputs of fewer elements take `nn.LayerNorm`: launching the two kernels from
# Python cost 404 us of CPU time per forward and backward pass against nn.LayerNorm's 162 (H200, Triton 3.6), more
# than they save on the GPU at (4096, 512) (22 against 31 us), where an eager step waits for the CPU already.
# A recorded graph launches them without that cost (and its warm-up steps take them too, so that they are compiled
# before the recording).
EAGER_MIN_ELEMENTS = 1 << 23


def kernel_available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x`` (CUDA tensors with Triton installed)."""
    return triton is not None and x.is_cuda


def fast_layer_norm_runs(x: torch.Tensor, norm: nn.LayerNorm) -> bool:
    """Whether `LayerNorm` runs ``norm`` on ``x`` through the kernels: fast paths on (`flex.use_fast_path`), the
    kernels available, outside torch.compile (which fuses a layer norm itself), an affine norm over the last
    dimension of at most `MAX_WIDTH`, inputs of the parameters' dtype or under autocast (whose layer norm computes
    and returns fp32), and at least `EAGER_MIN_ELEMENTS` of them unless the step is for a CUDA graph
    (`graph_capture.graph_step`)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    return (use_fast_path(x, flex=False) and kernel_available(x) and not torch.compiler.is_compiling()
            and norm.weight is not None and norm.bias is not None and len(norm.normalized_shape) == 1
            and x.shape[-1] <= MAX_WIDTH and x.numel() > 0
            and (x.dtype == norm.weight.dtype or (autocast and norm.weight.dtype == torch.float32))
            and (x.numel() >= EAGER_MIN_ELEMENTS or graph_step()))


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` through the Triton kernels where `fast_layer_norm_runs` says so. Their backward pass is not
    differentiable twice (for a gradient penalty, run the readable path: `flex.fast_paths(False)`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fast_layer_norm_runs(x, self):
            return super().forward(x)
        out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        return _LayerNormFunction.apply(x, self.weight, self.bias, self.eps, out_dtype)


def _tile(width: int) -> tuple[int, int, int]:
    """(BLOCK_N, rows per tile, warps) for rows of ``width``: about 4096 elements per tile (the backward pass keeps
    two tiles of sums in registers)."""
    block = triton.next_power_of_2(width)
    return block, max(1, min(ROWS, 4096 // block)), 4 if block <= 1024 else 8


def _programs(rows: int, x: torch.Tensor, tile_rows: int) -> tuple[int, int]:
    """(programs, rows per program, a multiple of ``tile_rows``) for the backward pass: a few programs per
    multiprocessor."""
    slots = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2)
    per_program = -(-rows // slots)
    per_program = -(-per_program // tile_rows) * tile_rows
    return -(-rows // per_program), per_program


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        width = x.shape[-1]
        rows = x.reshape(-1, width).contiguous()
        m = rows.shape[0]
        out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, tile_rows, warps = _tile(width)
        with launch_device(x):
            _forward_kernel[(triton.cdiv(m, tile_rows),)](rows, weight, bias, out, mean, rstd, m, width, eps,
                                                         ROWS=tile_rows, BLOCK_N=block, num_warps=warps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        return out.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, weight, mean, rstd = ctx.saved_tensors
        m, width = rows.shape
        grad = grad.reshape(m, width).contiguous()
        grad_x = torch.empty(rows.shape, dtype=ctx.x_dtype, device=rows.device)
        block, tile_rows, warps = _tile(width)
        programs, per_program = _programs(m, rows, tile_rows)
        partial = torch.empty(2, programs, width, dtype=torch.float32, device=rows.device)
        with launch_device(rows):
            _backward_kernel[(programs,)](rows, weight, grad, grad_x, mean, rstd, partial, m, width, per_program,
                                          programs, ROWS=tile_rows, BLOCK_N=block, num_warps=warps)
        sums = partial.sum(dim=1).to(weight.dtype)  # (2, width): weight and bias gradients
        return grad_x.view(ctx.shape), sums[0], sums[1], None, None


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, m, n, eps,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """ROWS rows: y = (x - mean) / sqrt(var + eps) * w + b, in fp32; mean and 1 / sqrt(var + eps) kept."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < m) & (cols[None, :] < n)
        offsets = rows.to(tl.int64)[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n + eps)
        w = tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=rows < m)
        tl.store(rstd_ptr + rows, rstd, mask=rows < m)

    @triton.jit
    def _backward_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, partial_ptr, m, n, per_program,
                         programs, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """A run of ``per_program`` rows: their input gradients, and their sums of dy * x_hat and dy (the weight's
        and bias's gradients) into partial[0, program] and partial[1, program]."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        sum_w = tl.zeros((ROWS, BLOCK_N), tl.float32)
        sum_b = tl.zeros((ROWS, BLOCK_N), tl.float32)
        start = pid * per_program
        end = tl.minimum(start + per_program, m)
        for first in range(start, end, ROWS):
            rows = first + tl.arange(0, ROWS)
            mask = (rows[:, None] < end) & (cols[None, :] < n)
            offsets = rows.to(tl.int64)[:, None] * n + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=rows < end, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rows < end, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            w_dy = w[None, :] * dy
            c1 = tl.sum(x_hat * w_dy, axis=1) / n
            c2 = tl.sum(w_dy, axis=1) / n
            dx = (w_dy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            sum_w += dy * x_hat
            sum_b += dy
        tl.store(partial_ptr + pid * n + cols, tl.sum(sum_w, axis=0), mask=cols < n)
        tl.store(partial_ptr + (programs + pid) * n + cols, tl.sum(sum_b, axis=0), mask=cols < n)
