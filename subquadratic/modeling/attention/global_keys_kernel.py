"""Every query's part over a few global keys, merged with its window's result, in one Triton kernel on CUDA.

`sliding_window._with_global_tokens` gives each query the global keys outside its window as a second softmax part:
readably, a (T, G) mask, `dense.few_keys_dense_attend` over the G keys and `combine_softmax` with the window's
(out, lse). That is a few dozen small kernels per layer in each direction, each a pass over (B, H, T, D), and on
an H200 it was most of the 20 ms that 4 global tokens added to a 64K training step. Here one forward kernel reads
each block of queries with the window's result and writes the merged output and its log-sum-exp, and one backward
kernel writes the gradients of the queries, of the window's output and log-sum-exp, and per block partial sums
of the few keys' and values' gradients (added up by one sum).

For query t and global key g (position p_g, valid when the row has that many global tokens) the pair counts when
the key lies outside the query's window, offset o = p_g - t: not (o % d == 0 and -before * d <= o <= after * d)
for the head's dilation d, and, when causal, o <= 0. With s_g = q . k_g * scale over the allowed keys and the
window's log-sum-exp l_w:

    L = log(exp(l_w) + sum_g exp(s_g)),  out = exp(l_w - L) out_w + sum_g exp(s_g - L) v_g

(the joint softmax). Backward, with g the output's gradient and delta = g . out:
    d out_w = exp(l_w - L) g,  d l_w = exp(l_w - L) (g . out_w - delta),
    d s_g = P_g (g . v_g - delta),  dq = scale sum_g d s_g k_g,  dk_g = scale sum_t d s_g q_t,  dv_g = sum_t P_g g_t.
The output itself is not needed in backward: with p_w = exp(l_w - L), delta = p_w (g . out_w) + sum_g P_g (g . v_g),
from L (saved, one fp32 number per query), so nothing of size (T, D) is kept beyond what the window's own backward
keeps. No dropout: callers take the readable path when it is active.
"""

from __future__ import annotations

import torch

from .triton_support import launch_device, triton

if triton is not None:
    import triton.language as tl


# Global tokens per row the merged kernel takes: its (queries, global keys) tiles outgrow an H200's shared memory
# in fp32 past a few hundred. More take the readable path.
MAX_GLOBAL = 64


def kernel_available(query: torch.Tensor) -> bool:
    """Whether the global-token kernels can run on ``query``: CUDA tensors of a dtype they multiply in (fp16,
    bf16, fp32), with Triton installed."""
    return triton is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit
    def _allowed(offs_t, pos, valid, dil, before, after, CAUSAL: tl.constexpr):
        """(BLOCK_T, BLOCK_G) bool: query t may attend global key g outside its window."""
        offset = pos[None, :] - offs_t[:, None]
        in_window = (offset % dil == 0) & (offset >= -before * dil) & (offset <= after * dil)
        ok = valid[None, :] & (in_window == 0)
        if CAUSAL:
            ok = ok & (offset <= 0)
        return ok

    @triton.jit
    def _load_block(q_ptr, k_ptr, v_ptr, lw_ptr, pos_ptr, valid_ptr, dil_ptr, slot_ptr, heads, length, num_global,
                    before, after, scale, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kg,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        """This program's block of queries (of batch entry b, head h; its first row ``first``): the head's global
        keys and values, the scores with their mask, the window's log-sum-exp, and each row's global slot (-1: not
        a global token). Tile offsets are int32 and relative to the block's first row (int64 offsets of every
        element held all 255 registers and spilled)."""
        pid_t, pid_bh = tl.program_id(0), tl.program_id(1)  # the long axis on x (y takes at most 65,535)
        b, h = (pid_bh // heads).to(tl.int64), (pid_bh % heads).to(tl.int64)  # offsets past 2^31 elements
        first = pid_t * BLOCK_T
        local_t = tl.arange(0, BLOCK_T)
        offs_t = first + local_t
        offs_d = tl.arange(0, BLOCK_D)
        offs_g = tl.arange(0, BLOCK_G)
        in_seq = offs_t < length
        rows = in_seq[:, None] & (offs_d[None, :] < D)
        q_block = q_ptr + b * stride_qb + h * stride_qh + first.to(tl.int64) * stride_qt
        q = tl.load(q_block + local_t[:, None] * stride_qt + offs_d[None, :], mask=rows, other=0.0)
        keys = (offs_g[:, None] < num_global) & (offs_d[None, :] < D)
        key_offsets = b * stride_kb + h * stride_kh + offs_g[:, None] * stride_kg + offs_d[None, :]
        k = tl.load(k_ptr + key_offsets, mask=keys, other=0.0).to(q.dtype)  # (fp32 rows under autocast)
        v = tl.load(v_ptr + key_offsets, mask=keys, other=0.0).to(q.dtype)
        in_row = offs_g < num_global
        pos = tl.load(pos_ptr + b * num_global + offs_g, mask=in_row, other=0)
        valid = tl.load(valid_ptr + b * num_global + offs_g, mask=in_row, other=0) != 0
        dil = tl.load(dil_ptr + h)
        ok = _allowed(offs_t, pos, valid, dil, before, after, CAUSAL)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_T, BLOCK_G) fp32
        slot = tl.load(slot_ptr + b * length + offs_t, mask=in_seq, other=-1)
        lse_block = pid_bh.to(tl.int64) * length + first  # (B, H, T) contiguous
        lw = tl.load(lw_ptr + lse_block + local_t, mask=in_seq, other=0.0).to(tl.float32)
        return q, k, v, ok, scores, lw, in_seq, rows, lse_block, slot, b, h, pid_bh, pid_t, first

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, ow_ptr, lw_ptr, pos_ptr, valid_ptr, dil_ptr, slot_ptr, g_ptr,
                        out_ptr, lse_ptr, heads, length, num_global, before, after, scale, stride_qb, stride_qh,
                        stride_qt, stride_kb, stride_kh, stride_kg, stride_ob, stride_oh, stride_ot,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                        CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        q, k, v, ok, scores, lw, in_seq, rows, lse_block, slot, b, h, pid_bh, pid_t, first = _load_block(
            q_ptr, k_ptr, v_ptr, lw_ptr, pos_ptr, valid_ptr, dil_ptr, slot_ptr, heads, length, num_global, before,
            after, scale, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kg, D, BLOCK_D, BLOCK_T,
            BLOCK_G, CAUSAL, PRECISION)
        local_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        top = tl.maximum(lw, tl.max(tl.where(ok, scores, float("-inf")), axis=1))
        probs = tl.where(ok, tl.exp(scores - top[:, None]), 0.0)
        window = tl.exp(lw - top)
        total = window + tl.sum(probs, axis=1)
        # the window's output: (B, H, T, D) contiguous
        ow_block = ow_ptr + pid_bh.to(tl.int64) * length * D + first.to(tl.int64) * D
        ow = tl.load(ow_block + local_t[:, None] * D + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
        acc = (window[:, None] * ow + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)) / total[:, None]
        # a global token's row is its own attention over every key, computed by the caller ((B, H, G, D))
        is_global = slot >= 0
        g_head = g_ptr + pid_bh.to(tl.int64) * num_global * D
        own = tl.load(g_head + slot[:, None] * D + offs_d[None, :], mask=rows & is_global[:, None], other=0.0)
        acc = tl.where(is_global[:, None], own.to(tl.float32), acc)
        out_block = out_ptr + b * stride_ob + h * stride_oh + first.to(tl.int64) * stride_ot
        tl.store(out_block + local_t[:, None] * stride_ot + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rows)
        tl.store(lse_ptr + lse_block + local_t, top + tl.log(total), mask=in_seq)

    @triton.jit
    def _backward_kernel(q_ptr, k_ptr, v_ptr, ow_ptr, lw_ptr, lse_ptr, grad_ptr, pos_ptr, valid_ptr, dil_ptr,
                         slot_ptr, dq_ptr, dow_ptr, dlw_ptr, dk_ptr, dv_ptr, dg_ptr, heads, length, num_global,
                         before, after, scale, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh,
                         stride_kg, stride_ob, stride_oh, stride_ot, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, CAUSAL: tl.constexpr,
                         PRECISION: tl.constexpr):
        q, k, v, ok, scores, lw, in_seq, rows, lse_block, slot, b, h, pid_bh, pid_t, first = _load_block(
            q_ptr, k_ptr, v_ptr, lw_ptr, pos_ptr, valid_ptr, dil_ptr, slot_ptr, heads, length, num_global, before,
            after, scale, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kg, D, BLOCK_D, BLOCK_T,
            BLOCK_G, CAUSAL, PRECISION)
        local_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        offs_g = tl.arange(0, BLOCK_G)
        lse = tl.load(lse_ptr + lse_block + local_t, mask=in_seq, other=0.0)
        probs = tl.where(ok & in_seq[:, None], tl.exp(scores - lse[:, None]), 0.0)  # (BLOCK_T, BLOCK_G)
        window = tl.where(in_seq, tl.exp(lw - lse), 0.0)
        grad_block = grad_ptr + b * stride_ob + h * stride_oh + first.to(tl.int64) * stride_ot
        grad = tl.load(grad_block + local_t[:, None] * stride_ot + offs_d[None, :], mask=rows, other=0.0)
        # a global token's row came from the caller's rows: its gradient goes there, and nowhere else
        is_global = slot >= 0
        dg_head = dg_ptr + pid_bh.to(tl.int64) * num_global * D
        tl.store(dg_head + slot[:, None] * D + offs_d[None, :], grad.to(dg_ptr.dtype.element_ty),
                 mask=rows & is_global[:, None])
        grad = tl.where(is_global[:, None], 0.0, grad)
        grad32 = grad.to(tl.float32)
        # the window's output and its gradient, and the queries' gradient: (B, H, T, D) contiguous
        row_block = pid_bh.to(tl.int64) * length * D + first.to(tl.int64) * D
        row_offsets = local_t[:, None] * D + offs_d[None, :]
        ow = tl.load(ow_ptr + row_block + row_offsets, mask=rows, other=0.0).to(tl.float32)
        grad_ow = tl.sum(grad32 * ow, axis=1)
        tl.store(dow_ptr + row_block + row_offsets, (window[:, None] * grad32).to(dow_ptr.dtype.element_ty),
                 mask=rows)
        grad_probs = tl.dot(grad.to(v.dtype), tl.trans(v), input_precision=PRECISION)  # (BLOCK_T, BLOCK_G)
        # delta = g . out with out = window out_w + P v, without forming out: g . (P v) = sum_g P_g (g . v_g)
        delta = window * grad_ow + tl.sum(probs * grad_probs, axis=1)
        tl.store(dlw_ptr + lse_block + local_t, window * (grad_ow - delta), mask=in_seq)
        grad_scores = probs * (grad_probs - delta[:, None])
        dq = tl.dot(grad_scores.to(k.dtype), k, input_precision=PRECISION) * scale
        tl.store(dq_ptr + row_block + row_offsets, dq.to(dq_ptr.dtype.element_ty), mask=rows)
        # this block's share of the keys' and values' gradients: (BLOCK_G, BLOCK_D) each, in fp32
        dk = tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=PRECISION) * scale
        dv = tl.dot(tl.trans(probs.to(v.dtype)), grad.to(v.dtype), input_precision=PRECISION)
        # (only the rows of global keys that exist: the sum over blocks reads no padding)
        part = (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_t) * num_global * BLOCK_D
        part_offsets = part + offs_g[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(dk_ptr + part_offsets, dk, mask=offs_g[:, None] < num_global)
        tl.store(dv_ptr + part_offsets, dv, mask=offs_g[:, None] < num_global)


# Kernel configuration, fixed ahead of time (no autotuning at a user's first step): queries per program, warps.
BLOCK_T, NUM_WARPS = 64, 4
def _launch_settings(query: torch.Tensor, num_global: int) -> dict:
    d = query.shape[-1]
    return dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_T=BLOCK_T,
                BLOCK_G=max(16, triton.next_power_of_2(num_global)),
                PRECISION="ieee", num_warps=NUM_WARPS)


def _strides(*tensors: torch.Tensor) -> tuple:
    return tuple(stride for x in tensors for stride in x.stride()[:3])


class _MergeGlobalKeys(torch.autograd.Function):
    """See the module's docstring; the arguments are those of `merge_global_keys`, in the layouts it makes."""

    @staticmethod
    def forward(ctx, query, out_w, lse_w, key, value, rows, index, valid, slot, dilation, before, after, causal,
                scale):
        b, h, t, _ = query.shape
        num = key.shape[2]
        settings = _launch_settings(query, num)
        # (B, T, H, D) in memory, so that merging the heads afterwards is a view
        out = out_w.new_empty(b, t, h, out_w.shape[-1]).transpose(1, 2)
        lse = torch.empty(b, h, t, dtype=torch.float32, device=query.device)
        grid = (triton.cdiv(t, BLOCK_T), b * h)
        with launch_device(query):
            _forward_kernel[grid](query, key, value, out_w, lse_w, index, valid, dilation, slot, rows, out, lse, h,
                                  t, num, before, after, scale, *_strides(query, key, out), CAUSAL=causal,
                                  **settings)
        ctx.save_for_backward(query, out_w, lse_w, key, value, index, valid, slot, dilation, lse)
        ctx.constants = (before, after, causal, scale, rows.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        query, out_w, lse_w, key, value, index, valid, slot, dilation, lse = ctx.saved_tensors
        before, after, causal, scale, rows_dtype = ctx.constants
        b, h, t, d = query.shape
        num = key.shape[2]
        settings = _launch_settings(query, num)
        grid = (triton.cdiv(t, BLOCK_T), b * h)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        dq, dow = query.new_empty(b, h, t, d), torch.empty_like(out_w)
        dlw = torch.empty(lse_w.shape, dtype=torch.float32, device=query.device)
        d_rows = torch.zeros(b, h, num, d, dtype=rows_dtype, device=query.device)  # slots of no token stay 0
        parts = torch.empty(2, b * h, grid[0], num, settings["BLOCK_D"], dtype=torch.float32, device=query.device)
        with launch_device(query):
            _backward_kernel[grid](query, key, value, out_w, lse_w, lse, grad, index, valid, dilation, slot, dq,
                                   dow, dlw, parts[0], parts[1], d_rows, h, t, num, before, after, scale,
                                   *_strides(query, key, grad), CAUSAL=causal, **settings)
        dk, dv = parts.sum(dim=2)[..., :d].reshape(2, b, h, num, d).to(key.dtype).unbind(0)
        return (dq, dow, dlw.to(lse_w.dtype), dk, dv, d_rows) + (None,) * 8


def merge_global_keys(query: torch.Tensor, out_w: torch.Tensor, lse_w: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                      slot: torch.Tensor, dilation: torch.Tensor, before: int, after: int, causal: bool,
                      scale: float) -> torch.Tensor:
    """The window's result merged with every query's part over the global keys outside its window, and the
    global tokens' own rows written at their positions.

    query (B, H, T, D), any strides with D contiguous; out_w (B, H, T, D) and lse_w (B, H, T) the window part's
    output and log-sum-exp; key/value (B, H, G, D) the global tokens' keys and values (any float dtype, cast to
    the query's in registers); rows (B, H, G, D) the global tokens' own outputs; index (B, G) int their
    positions, valid (B, G) bool which of them exist, slot (B, T) int each position's global slot or -1
    (`GlobalTokens.slots`); dilation (H,) int per head; before/after the window's reach in steps of the
    dilation; causal; scale the score scale. Returns (B, H, T, D) in out_w's dtype, laid out as (B, T, H, D)
    (merging its heads is a view). CUDA (or Triton's interpreter) only: see `kernel_available`."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    # keys and values are read through one set of strides
    if key.stride() != value.stride() or key.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    valid = valid.view(torch.int8) if valid.dtype == torch.bool else valid.to(torch.int8)
    return _MergeGlobalKeys.apply(query, out_w.contiguous(), lse_w.contiguous(), key, value, rows.contiguous(),
                                  index.contiguous(), valid.contiguous(), slot.contiguous(),
                                  dilation.to(query.device).contiguous(), before, after, causal, scale)
