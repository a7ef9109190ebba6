"""A few queries over every token, with the key and value maps folded in (the global tokens' own attention), in
Triton kernels on CUDA.

`sliding_window.SlidingWindowSelfAttention._global_queries` folds the global key map into the G global queries of
each head, so that R = H * G rows of width E (the hidden size) attend to the inputs x_t themselves. Readably that
is `dense.few_queries_attend` with the keys cut into chunks: a score product, a reshape, the masked softmax's
kernels, the value product, a sum over chunks, and as many again backward, each a pass over the (T, E) inputs or
the (R, T) scores. Here (split over the keys, as flash decoding does):

- forward: one program per block of keys computes the block's scores (R, N), their max m and sum l of exp(s - m),
  and its share of the output, sum_t exp(s_t - m) x_t (R, E), in fp32; one more kernel weighs the blocks' shares
  by exp(m - M) for the largest m, M, and divides by the total: the softmax over every key.
- backward: one program per block recomputes the scores with the saved log-sum-exp, and writes the inputs'
  gradient for its keys, scale * dS^T q + P^T g (each key belongs to one block), and its share of the queries'
  gradient, scale * dS x (R, E); the shares are added up by one sum. With delta = g . out, dS = P (g . x - delta).

Masking is that of the readable path: a key outside the sequence counts for nothing; a key that is padding, or
(causal) after the global token's position, gets the finite score MASK_VALUE, so a row with no allowed key
averages instead of giving NaN. The queries and inputs are read in their own dtypes (fp32 under autocast) and
multiplied in the products' dtype (bf16 under autocast), cast in registers, so no cast of the (T, E) inputs is
made; their gradient is written in their dtype. No dropout: callers take the readable path when it is active.
"""

from __future__ import annotations

import torch

from .masking import MASK_VALUE
from .triton_support import launch_device, triton

if triton is not None:
    import triton.language as tl

    _MASK_VALUE = tl.constexpr(MASK_VALUE)  # a kernel reads module globals only as constexprs

    @triton.jit
    def _compute(x, CAST: tl.constexpr):
        """x in the products' dtype: 1 bf16, 2 fp16, else fp32."""
        if CAST == 1:
            return x.to(tl.bfloat16)
        elif CAST == 2:
            return x.to(tl.float16)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _allowed_keys(ok_ptr, pos_ptr, pid_b, offs_r, offs_n, rows, length, num_global,
                      CAUSAL: tl.constexpr, HAS_OK: tl.constexpr):
        """(BLOCK_R, BLOCK_N) bool: the row's global token may attend to key n (key in the sequence assumed)."""
        in_seq = offs_n < length
        allowed = in_seq[None, :] & (offs_r[:, None] < rows)
        if HAS_OK:
            ok = tl.load(ok_ptr + pid_b * length + offs_n, mask=in_seq, other=0) != 0
            allowed = allowed & ok[None, :]
        if CAUSAL:
            pos = tl.load(pos_ptr + pid_b * num_global + offs_r % tl.maximum(num_global, 1), mask=offs_r < rows,
                          other=0)
            allowed = allowed & (offs_n[None, :] <= pos[:, None])
        return allowed

    @triton.jit
    def _forward_kernel(q_ptr, x_ptr, ok_ptr, pos_ptr, part_ptr, max_ptr, sum_ptr, rows, length, hidden,
                        num_global, num_blocks, scale, stride_xb, stride_xt, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_OK: tl.constexpr, CAST: tl.constexpr, PRECISION: tl.constexpr):
        pid_n, pid_b = tl.program_id(0), tl.program_id(1)  # the long axis on x (y takes at most 65,535)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, BLOCK_E)
        in_rows, in_seq = offs_r < rows, offs_n < length
        q_base = q_ptr + pid_b.to(tl.int64) * rows * hidden + offs_r[:, None] * hidden
        x_base = x_ptr + pid_b.to(tl.int64) * stride_xb + offs_n[:, None].to(tl.int64) * stride_xt
        scores = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for e0 in range(0, hidden, BLOCK_E):
            in_e = e0 + offs_e < hidden
            q = tl.load(q_base + e0 + offs_e[None, :], mask=in_rows[:, None] & in_e[None, :], other=0.0)
            x = tl.load(x_base + e0 + offs_e[None, :], mask=in_seq[:, None] & in_e[None, :], other=0.0)
            scores += tl.dot(_compute(q, CAST), tl.trans(_compute(x, CAST)), input_precision=PRECISION)
        allowed = _allowed_keys(ok_ptr, pos_ptr, pid_b, offs_r, offs_n, rows, length, num_global, CAUSAL, HAS_OK)
        scores = tl.where(allowed, scores * scale, _MASK_VALUE)
        scores = tl.where(in_seq[None, :], scores, float("-inf"))
        top = tl.max(scores, axis=1)
        probs = tl.exp(scores - top[:, None])
        stat = (pid_b.to(tl.int64) * rows + offs_r) * num_blocks + pid_n
        tl.store(max_ptr + stat, top, mask=in_rows)
        tl.store(sum_ptr + stat, tl.sum(probs, axis=1), mask=in_rows)
        part_base = part_ptr + stat[:, None] * hidden
        for e0 in range(0, hidden, BLOCK_E):
            in_e = e0 + offs_e < hidden
            x = tl.load(x_base + e0 + offs_e[None, :], mask=in_seq[:, None] & in_e[None, :], other=0.0)
            share = tl.dot(_compute(probs, CAST), _compute(x, CAST), input_precision=PRECISION)
            tl.store(part_base + e0 + offs_e[None, :], share, mask=in_rows[:, None] & in_e[None, :])

    @triton.jit
    def _combine_kernel(part_ptr, max_ptr, sum_ptr, out_ptr, row_max_ptr, log_total_ptr, hidden, num_blocks,
                        BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
        """One program per row and BLOCK_E columns: the blocks' shares weighed by exp(m - M), over the total."""
        row, pid_e = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs_k = tl.arange(0, BLOCK_K)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        top = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        for k0 in range(0, num_blocks, BLOCK_K):
            m = tl.load(max_ptr + row * num_blocks + k0 + offs_k, mask=k0 + offs_k < num_blocks,
                        other=float("-inf"))
            top = tl.maximum(top, m)
        best = tl.max(top, axis=0)
        total = tl.zeros((BLOCK_K,), tl.float32)
        acc = tl.zeros((BLOCK_E,), tl.float32)
        for k0 in range(0, num_blocks, BLOCK_K):
            in_k = k0 + offs_k < num_blocks
            m = tl.load(max_ptr + row * num_blocks + k0 + offs_k, mask=in_k, other=float("-inf"))
            weight = tl.exp(m - best)
            total += weight * tl.load(sum_ptr + row * num_blocks + k0 + offs_k, mask=in_k, other=0.0)
            share = tl.load(part_ptr + (row * num_blocks + k0 + offs_k[:, None]) * hidden + offs_e[None, :],
                            mask=in_k[:, None] & (offs_e[None, :] < hidden), other=0.0)
            acc += tl.sum(weight[:, None] * share, axis=0)
        norm = tl.sum(total, axis=0)
        tl.store(out_ptr + row * hidden + offs_e, (acc / norm).to(out_ptr.dtype.element_ty), mask=offs_e < hidden)
        if pid_e == 0:  # the log-sum-exp in two parts: M + log(total) would lose the masked scores' digits
            tl.store(row_max_ptr + row, best)
            tl.store(log_total_ptr + row, tl.log(norm))

    @triton.jit
    def _backward_kernel(q_ptr, x_ptr, ok_ptr, pos_ptr, out_ptr, row_max_ptr, log_total_ptr, grad_ptr, dx_ptr,
                         dq_part_ptr, rows, length, hidden, num_global, num_blocks, scale, stride_xb, stride_xt,
                         stride_dxb, stride_dxt, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_OK: tl.constexpr, CAST: tl.constexpr,
                         PRECISION: tl.constexpr):
        pid_n, pid_b = tl.program_id(0), tl.program_id(1)  # the long axis on x (y takes at most 65,535)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, BLOCK_E)
        in_rows, in_seq = offs_r < rows, offs_n < length
        row_offsets = pid_b.to(tl.int64) * rows * hidden + offs_r[:, None] * hidden
        x_base = x_ptr + pid_b.to(tl.int64) * stride_xb + offs_n[:, None].to(tl.int64) * stride_xt
        scores = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        grad_probs = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        delta = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for e0 in range(0, hidden, BLOCK_E):
            in_e = e0 + offs_e < hidden
            row_mask = in_rows[:, None] & in_e[None, :]
            q = tl.load(q_ptr + row_offsets + e0 + offs_e[None, :], mask=row_mask, other=0.0)
            g = tl.load(grad_ptr + row_offsets + e0 + offs_e[None, :], mask=row_mask, other=0.0)
            o = tl.load(out_ptr + row_offsets + e0 + offs_e[None, :], mask=row_mask, other=0.0)
            x = tl.load(x_base + e0 + offs_e[None, :], mask=in_seq[:, None] & in_e[None, :], other=0.0)
            x = tl.trans(_compute(x, CAST))
            scores += tl.dot(_compute(q, CAST), x, input_precision=PRECISION)
            grad_probs += tl.dot(_compute(g, CAST), x, input_precision=PRECISION)
            delta += tl.sum(g.to(tl.float32) * o.to(tl.float32), axis=1)
        allowed = _allowed_keys(ok_ptr, pos_ptr, pid_b, offs_r, offs_n, rows, length, num_global, CAUSAL, HAS_OK)
        scores = tl.where(allowed, scores * scale, _MASK_VALUE)
        row_max = tl.load(row_max_ptr + pid_b * rows + offs_r, mask=in_rows, other=0.0)
        log_total = tl.load(log_total_ptr + pid_b * rows + offs_r, mask=in_rows, other=0.0)
        probs = tl.where(in_seq[None, :] & in_rows[:, None],
                         tl.exp((scores - row_max[:, None]) - log_total[:, None]), 0.0)
        # the scores' gradient (scaled scores); masked keys took a constant, so theirs is zero
        grad_scores = tl.where(allowed, probs * (grad_probs - delta[:, None]), 0.0) * scale
        dx_base = dx_ptr + pid_b.to(tl.int64) * stride_dxb + offs_n[:, None].to(tl.int64) * stride_dxt
        part_base = dq_part_ptr + ((pid_b.to(tl.int64) * rows + offs_r[:, None]) * num_blocks + pid_n) * hidden
        for e0 in range(0, hidden, BLOCK_E):
            in_e = e0 + offs_e < hidden
            row_mask = in_rows[:, None] & in_e[None, :]
            q = _compute(tl.load(q_ptr + row_offsets + e0 + offs_e[None, :], mask=row_mask, other=0.0), CAST)
            g = _compute(tl.load(grad_ptr + row_offsets + e0 + offs_e[None, :], mask=row_mask, other=0.0), CAST)
            x = tl.load(x_base + e0 + offs_e[None, :], mask=in_seq[:, None] & in_e[None, :], other=0.0)
            dx = (tl.dot(tl.trans(_compute(grad_scores, CAST)), q, input_precision=PRECISION)
                  + tl.dot(tl.trans(_compute(probs, CAST)), g, input_precision=PRECISION))
            tl.store(dx_base + e0 + offs_e[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=in_seq[:, None] & in_e[None, :])
            dq = tl.dot(_compute(grad_scores, CAST), _compute(x, CAST), input_precision=PRECISION)
            tl.store(part_base + e0 + offs_e[None, :], dq, mask=row_mask)


# Kernel configuration, fixed ahead of time (no autotuning at a user's first step): keys per program in the
# forward and backward kernels, columns per tile, blocks per step of the combination, warps. On an H200 (Triton
# 3.6; 32 rows, hidden 512, fp32 inputs, bf16 products) the forward pass took 20 / 101 us at 16K / 64K tokens with
# 128 keys per program and 31 / 135 us with 64; the backward pass, 53 / 184 us with 64, is no faster with 128
# (its tiles spill registers) or with 8 warps. With more than 32 rows the forward's 128-key tiles spill too (as
# compiled for sm_90): it takes 64 keys there.
FORWARD_BLOCK_N, BLOCK_N, BLOCK_E, BLOCK_K, NUM_WARPS = 128, 64, 64, 32, 4
# Rows (heads x global tokens) one program holds: its (rows, keys) tiles live in registers and shared memory, which
# a block of 128 fp32 rows outgrows on an H100/H200. More rows take the readable path.
MAX_ROWS = 64


_CASTS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 0}


def _settings(query: torch.Tensor, causal: bool, key_ok: torch.Tensor | None, compute: torch.dtype,
              block_n: int) -> dict:
    return dict(BLOCK_R=max(16, triton.next_power_of_2(query.shape[1])), BLOCK_N=block_n, BLOCK_E=BLOCK_E,
                CAUSAL=causal, HAS_OK=key_ok is not None, CAST=_CASTS[compute],
                PRECISION="ieee", num_warps=NUM_WARPS)


class _GlobalQueries(torch.autograd.Function):
    """See the module's docstring; the arguments are those of `global_queries_attend`, made contiguous."""

    @staticmethod
    def forward(ctx, query, inputs, key_ok, positions, causal, scale, compute):
        b, rows, hidden = query.shape
        t = inputs.shape[1]
        block_n = FORWARD_BLOCK_N if rows <= 32 else BLOCK_N
        blocks = triton.cdiv(t, block_n)
        settings = _settings(query, causal, key_ok, compute, block_n)
        parts = torch.empty(b, rows, blocks, hidden, dtype=torch.float32, device=query.device)
        maxima, sums = torch.empty(2, b, rows, blocks, dtype=torch.float32, device=query.device).unbind(0)
        out = torch.empty_like(query)
        row_max, log_total = torch.empty(2, b, rows, dtype=torch.float32, device=query.device).unbind(0)
        ok = key_ok if key_ok is not None else positions  # not read without HAS_OK
        with launch_device(query):
            _forward_kernel[(blocks, b)](query, inputs, ok, positions, parts, maxima, sums, rows, t, hidden,
                                         positions.shape[1], blocks, scale, inputs.stride(0), inputs.stride(1),
                                         **settings)
            _combine_kernel[(b * rows, triton.cdiv(hidden, BLOCK_E))](
                parts, maxima, sums, out, row_max, log_total, hidden, blocks, BLOCK_K=BLOCK_K, BLOCK_E=BLOCK_E,
                num_warps=NUM_WARPS)
        ctx.save_for_backward(query, inputs, key_ok, positions, out, row_max, log_total)
        ctx.constants = (causal, scale, compute)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        query, inputs, key_ok, positions, out, row_max, log_total = ctx.saved_tensors
        causal, scale, compute = ctx.constants
        b, rows, hidden = query.shape
        t = inputs.shape[1]
        blocks = triton.cdiv(t, BLOCK_N)
        settings = _settings(query, causal, key_ok, compute, BLOCK_N)
        grad = grad.contiguous()
        dx = torch.empty_like(inputs)
        dq_parts = torch.empty(b, rows, blocks, hidden, dtype=torch.float32, device=query.device)
        ok = key_ok if key_ok is not None else positions
        with launch_device(query):
            _backward_kernel[(blocks, b)](
                query, inputs, ok, positions, out, row_max, log_total, grad, dx, dq_parts, rows, t, hidden,
                positions.shape[1], blocks, scale, inputs.stride(0), inputs.stride(1), dx.stride(0), dx.stride(1),
                **settings)
        return dq_parts.sum(dim=2).to(query.dtype), dx, None, None, None, None, None


class _RowsBesideInputs(torch.autograd.Function):
    """(rows of inputs at positions, inputs passed through); see `rows_beside_inputs`."""

    @staticmethod
    def forward(ctx, inputs, positions):
        ctx.save_for_backward(positions)
        ctx.shape = inputs.shape
        return inputs.gather(1, positions[:, :, None].expand(-1, -1, inputs.shape[2])), inputs.view_as(inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows, grad_inputs):
        (positions,) = ctx.saved_tensors
        if grad_rows is None:
            return grad_inputs, None
        index = positions[:, :, None].expand(-1, -1, grad_rows.shape[2])
        if grad_inputs is None:
            return torch.zeros(ctx.shape, dtype=grad_rows.dtype, device=grad_rows.device).scatter_add_(
                1, index, grad_rows), None
        # the inputs' gradient is a fresh (B, T, E) result that nothing else holds (see rows_beside_inputs)
        return grad_inputs.scatter_add_(1, index, grad_rows.to(grad_inputs.dtype)), None


def rows_beside_inputs(inputs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (B, T, E), positions (B, G) int64 -> (the rows at positions (B, G, E), inputs itself), for a caller
    whose every use of the inputs returned here gives them a fresh gradient that nothing else holds (the global
    queries kernel's input gradient, `global_queries_attend`; the concatenation of the gradients of a split's
    parts). The rows' gradient is then added into that one in place: a plain gather's backward writes a (B, T, E)
    zero tensor and scatters into it, which autograd then adds to the other, two more passes over (T, E) per
    layer."""
    return _RowsBesideInputs.apply(inputs, positions)


def global_queries_attend(query: torch.Tensor, inputs: torch.Tensor, key_ok: torch.Tensor | None,
                          positions: torch.Tensor, causal: bool, scale: float,
                          compute: torch.dtype | None = None) -> torch.Tensor:
    """Softmax attention of R = H * G rows over every token's input: query (B, R, E), row h * G + g the global
    token g of head h with the key map folded in; inputs (B, T, E), the keys and values alike; key_ok (B, T) bool
    or None (every key real); positions (B, G) int, the global tokens' positions (read when causal: a row attends
    to keys up to its token's position); compute: the dtype the products take (default the query's; under
    autocast its dtype): query and inputs are read in their own dtypes and cast in registers. Returns (B, R, E)
    in the query's dtype. CUDA (or Triton's interpreter) only: see `global_keys_kernel.kernel_available`."""
    if query.shape[1] > MAX_ROWS:
        raise ValueError(f"global_queries_attend takes at most MAX_ROWS={MAX_ROWS} rows (heads x global tokens), "
                         f"got {query.shape[1]}: use the readable path (`dense.few_queries_attend`) for more.")
    if query.shape[1] == 0:  # no global tokens: nothing to attend (and no rows to take a position from)
        return query.clone()
    if inputs.stride(-1) != 1:
        inputs = inputs.contiguous()
    if key_ok is not None:
        key_ok = (key_ok.view(torch.int8) if key_ok.dtype == torch.bool else key_ok.to(torch.int8)).contiguous()
    return _GlobalQueries.apply(query.contiguous(), inputs, key_ok, positions.contiguous(), causal, scale,
                                compute or query.dtype)
