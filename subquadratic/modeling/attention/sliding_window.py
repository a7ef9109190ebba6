"""Sliding-window, dilated and global self-attention (Longformer, Beltagy et al. 2020, section 3.1).

Window: with window size w (even), token i attends to the tokens i + k * d for -w/2 <= k <= w/2, or, when causal,
for -w <= k <= 0; d is the head's dilation (1: consecutive tokens). Global: tokens marked global attend to every
(earlier, when causal) token, with their own query/key/value projections, and every (later, when causal) token
attends to them with the ordinary projections. A query's softmax runs over the union of its window and the global
keys, each key counted once (a global key inside a query's window belongs to the window part, and is left out
of that query's global part).

Memory and time are linear in the length T: no (T, T) score matrix is ever built.

* Window part: the tokens of each residue class modulo d form a sequence of S = T / d tokens on which dilated
  attention is plain sliding-window attention. That sequence is cut into n query blocks of c = w / 2 tokens;
  a block attends to the c + w keys from its first query's window start to its last query's window end, taken
  from the key sequence by `unfold` (a view; under torch.compile an index gather, see `_windows`), and a band
  mask keeps each query's own w + 1. Scores are
  (B, H, d, n, c, c + w): 1.5 w per query (transformers' overlapping chunks compute 2 w).
* Global keys: (T, G) scores for G global tokens; global queries: (G, T) scores.
The two parts of each query's softmax are computed separately and combined by their log-sum-exp (exactly the
joint softmax), which reuses `dense_attend` and never concatenates scores.

The number of global tokens G is the only size read from the data; without a global mask the global path is
skipped (that choice depends on whether a mask is passed, not on its values).

The global queries' key and value maps are folded into the G queries (`_global_queries`), so no (T, hidden) global
keys or values are projected.

Fast path (on CUDA by default, see `flex`): the window part runs through FlexAttention instead
(`flex_window_attend`, same pairs and results); the global parts run as Triton kernels (their positions are data,
which a cached block mask cannot hold): every query's global keys merged with its window's result, and the global
tokens' rows written, in one kernel each way (`global_keys_kernel`); the global queries over every token in
split-key kernels (`global_queries_kernel`)."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn

from ..cache import LayerStateCache
from ..graph_capture import capturing
from .dense import dense_attend, few_keys_dense_attend, few_queries_attend, full_attend
from .flex import cached_block_mask, flex_attention, flex_can_run, use_fast_path
from .global_keys_kernel import MAX_GLOBAL, kernel_available, merge_global_keys
from .global_queries_kernel import MAX_ROWS, global_queries_attend, rows_beside_inputs
from .masking import MASK_VALUE, merge_heads, split_heads
from .projections import anything_watching, concatenated_weights, fuses, product_dtype, project, split_outputs


def _to_dilated(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(B, H, T, ...) with T = S * d -> (B, H, d, S, ...): the residue classes of positions modulo d, each in
    order (position s * d + r lands at [r, s])."""
    b, h, t = x.shape[:3]
    return x.view(b, h, t // dilation, dilation, *x.shape[3:]).transpose(2, 3)


def _from_dilated(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `_to_dilated`: (B, H, d, S, ...) -> (B, H, S * d, ...)."""
    b, h, d, s = x.shape[:4]
    return x.transpose(2, 3).reshape(b, h, s * d, *x.shape[4:])


def _windows(x: torch.Tensor, before: int, after: int, block: int, fill=0.0) -> torch.Tensor:
    """(..., S, E) -> (..., n, E, block + before + after): for each query block of ``block`` positions, the keys
    from ``before`` positions before it to ``after`` after it (``fill`` outside the sequence).

    Eager: `unfold`, a view. Compiled: the same windows gathered by index, because inductor's backward of
    overlapping `unfold` windows gives wrong gradients (pytorch#172064; seen here on CPU with torch 2.13 and on
    an H200 with 2.11), while the gather's backward (an accumulating index_put) is right."""
    padded = nn.functional.pad(x, (0, 0, before, after), value=fill)
    width = block + before + after
    if not torch.compiler.is_compiling():
        return padded.unfold(-2, width, block)
    n = x.shape[-2] // block
    index = torch.arange(n, device=x.device)[:, None] * block + torch.arange(width, device=x.device)  # (n, width)
    return padded[..., index, :].transpose(-1, -2)


def _pad_tokens(extra: int, query, key, value, key_ok):
    """Append ``extra`` positions to query/key/value (B, H, T, D); key_ok (B, T) masks the added keys (None: the
    caller masks them another way)."""
    if extra:
        query, key, value = (nn.functional.pad(x, (0, 0, 0, extra)) for x in (query, key, value))
        if key_ok is not None:
            key_ok = nn.functional.pad(key_ok, (0, extra), value=False)
    return query, key, value, key_ok


def sliding_window_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, dilation: int,
                          causal: bool, key_ok: torch.Tensor, dropout: nn.Module | None = None):
    """Dilated sliding-window attention for heads sharing one dilation.

    query/key/value (B, H, T, D), any T; key_ok (B, T) bool: keys a window may contain (the real ones).
    Returns (out (B, H, T, D), logsumexp (B, H, T) in fp32) for combining with other keys."""
    b, h, t, d_head = query.shape
    d = dilation
    # Clip the reach to the sequence (offsets beyond S - 1 never hit a token), then choose the block so that
    # short sequences do not pay for a long window.
    s_raw = -(-t // d)
    before = min(window if causal else window // 2, s_raw - 1)
    after = 0 if causal else min(window // 2, s_raw - 1)
    block = max(1, min(window // 2, s_raw))
    extra = (-t) % (d * block)  # pad T to whole blocks of every residue class
    query, key, value, key_ok = _pad_tokens(extra, query, key, value, key_ok)
    s = (t + extra) // d
    n = s // block

    q = _to_dilated(query, d).reshape(b, h, d, n, block, d_head)
    k = _windows(_to_dilated(key, d), before, after, block).transpose(-1, -2)  # (B, H, d, n, c+w', D)
    v = _windows(_to_dilated(value, d), before, after, block).transpose(-1, -2)
    ok = _windows(_to_dilated(key_ok[:, None, :, None], d), before, after, block, fill=False)  # (B,1,d,n,1,c+w')
    # Band: query slot i of a block sees key slots i .. i + before + after of its window.
    i = torch.arange(block, device=query.device)[:, None]
    m = torch.arange(block + before + after, device=query.device)[None, :]
    allowed = ok & ((m >= i) & (m <= i + before + after))  # (B, 1, d, n, c, c+w')

    out, lse = dense_attend(q, k, v, allowed, 1.0 / math.sqrt(d_head), dropout)
    out = _from_dilated(out.reshape(b, h, d, s, d_head))[:, :, :t]
    lse = _from_dilated(lse.reshape(b, h, d, s))[:, :, :t]
    return out, lse


def flex_window_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, dilation: int,
                       causal: bool, key_ok: torch.Tensor | None, need_lse: bool = True):
    """`sliding_window_attend` through FlexAttention (no dropout): same arguments, pairs and results; ``key_ok``
    may also be None (every key real: no padding and no global tokens). Without ``need_lse`` the log-sum-exp is
    not returned (None in its place): the kernels then neither give it out nor take its gradient.

    The residue classes modulo d are laid end to end (position s * d + r goes to r * S + s), so each class is a
    plain band of its own and a dilated head costs what an undilated one does. That pattern depends only on the
    sizes (with the positions added to fill the last class), so its block mask is built once; which keys are
    real is data, so it enters through a score_mod, which also runs on the block mask's full blocks
    (those skip the mask_mod). Masked keys get MASK_VALUE as in the readable path: a query whose window keys are
    all masked averages instead of giving NaN, and its finite log-sum-exp combines with the global part as the
    readable one does. Without ``key_ok`` there is no score_mod: the kernels are those of a plain band."""
    b, h, t, d_head = query.shape
    d = dilation
    extra = (-t) % d  # pad T to whole residue classes
    query, key, value, key_ok = _pad_tokens(extra, query, key, value, key_ok)
    s = (t + extra) // d

    def class_major(x):  # (B, H, T, ...) -> the same shape, classes end to end (a view when d = 1)
        return _to_dilated(x, d).reshape(x.shape)

    q, k, v = (class_major(x) for x in (query, key, value))
    before, after = (window, 0) if causal else (window // 2, window // 2)

    def band(b, h, q_idx, kv_idx):  # same class, and the key at most `before` steps before / `after` after
        return (q_idx // s == kv_idx // s) & (q_idx - kv_idx <= before) & (kv_idx - q_idx <= after)

    if d == 1:  # one class: the kernels need not evaluate the class test (on an H200 at 16K it cost 3-6%)
        def band(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx <= before) & (kv_idx - q_idx <= after)

    def band_of_real_keys(b, h, q_idx, kv_idx):  # and the key not one of the `extra` added positions
        return band(b, h, q_idx, kv_idx) & ((kv_idx % s) * d + kv_idx // s < t)

    mask_mod, mask_key = band, ("sliding_window", before, after, s)
    score_mod = None
    if key_ok is not None:
        ok = class_major(key_ok[:, None, :, None])[:, 0, :, 0]  # (B, T)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(ok[b, kv_idx], score, MASK_VALUE)
    elif extra:
        mask_mod, mask_key = band_of_real_keys, mask_key + (t,)
    block_mask = cached_block_mask(mask_key, mask_mod, None, None, d * s, d * s, query.device,
                                   reach=(before, after))
    result = flex_attention(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=1.0 / math.sqrt(d_head),
                            return_lse=need_lse)
    out, lse = result if need_lse else (result, None)
    out = _from_dilated(out.reshape(b, h, d, s, d_head))[:, :, :t]
    return out, None if lse is None else _from_dilated(lse.reshape(b, h, d, s))[:, :, :t]


class _CombineSoftmax(torch.autograd.Function):
    """out = (1 - w) out_a + w out_b with w = sigmoid(lse_b - lse_a) (= exp(lse_b - logaddexp(lse_a, lse_b))),
    in out_a's dtype (`torch.lerp`, which computes in fp32 for bf16 and fp16 inputs, with w rounded to that dtype).

    Backward, with g the output's gradient: d out_a = (1 - w) g, d out_b = w g, and through
    dw / d(lse_b - lse_a) = w (1 - w): d lse_b = -d lse_a = w (1 - w) sum_D g (out_b - out_a), summed in fp32.
    w and 1 - w stay in fp32 there: rounded to bf16, a w near 1 (a query whose global key takes most of its
    attention) would round to 1 and zero the window part's gradient. Kept for it: out_a, out_b and w (one number
    per query). Autograd on the fp32 formula kept fp32 copies of both outputs and ran each pass over (T, D) per
    head in fp32, several times over. Not differentiable twice (w is computed without a graph)."""

    @staticmethod
    def forward(out_a, lse_a, out_b, lse_b):
        compute = torch.promote_types(lse_a.dtype, torch.float32)
        weight = torch.sigmoid(lse_b.to(compute) - lse_a.to(compute))[..., None]
        return torch.lerp(out_a, out_b.to(out_a.dtype), weight.to(out_a.dtype)), weight

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward: what torch.func's transforms need
        out_a, lse_a, out_b, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(out_a, out_b, output[1])
        ctx.lse_dtype = lse_a.dtype

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        out_a, out_b, weight = ctx.saved_tensors
        grad = grad.to(out_a.dtype)
        grad_a = grad * (1 - weight).to(grad.dtype)
        grad_b = grad * weight.to(grad.dtype)
        sums = (grad * (out_b.to(out_a.dtype) - out_a)).sum(-1, dtype=weight.dtype)
        weight = weight.squeeze(-1)
        grad_lse_b = (sums * weight * (1 - weight)).to(ctx.lse_dtype)
        return grad_a, -grad_lse_b, grad_b.to(out_b.dtype), grad_lse_b


def combine_softmax(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Two attention results over disjoint key sets -> the output over their union (..., T, D), in out_a's dtype.
    out (..., T, D), lse (..., T) in fp32; the union's log-sum-exp would be logaddexp(lse_a, lse_b)."""
    return _CombineSoftmax.apply(out_a, lse_a, out_b, lse_b)[0]


class _PutRows(torch.autograd.Function):
    """x (B, H, T, D) with rows (B, H, G, D) written in place at positions index (B, G) where valid (B, G).

    In place, since x is a fresh result that nothing keeps for backward; the backward pass is one gather and one
    scatter of the gradient. Autograd on out-of-place gather / where / scatter made three (T, D) tensors per
    head and added them up."""

    @staticmethod
    def forward(ctx, x, rows, index, valid):
        index = index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])  # (B, H, G, D)
        keep = valid[:, None, :, None]
        # padded slots of `index` (not valid) write back what their position already holds
        x.scatter_(2, index, torch.where(keep, rows.to(x.dtype), x.gather(2, index)))
        ctx.mark_dirty(x)
        ctx.save_for_backward(index, keep)
        ctx.rows_dtype = rows.dtype
        return x

    @staticmethod
    def backward(ctx, grad):
        index, keep = ctx.saved_tensors
        at_rows = grad.gather(2, index)
        grad_x = grad.scatter(2, index, at_rows.masked_fill(keep, 0))
        return grad_x, at_rows.masked_fill(~keep, 0).to(ctx.rows_dtype), None, None


class _ZeroGradientTo(torch.autograd.Function):
    """x unchanged, and an exact zero gradient for ``parameter``, on which x depends only through a term that
    leaves it unchanged. Keeps the parameter in the graph: DDP without `find_unused_parameters` expects a gradient
    for every parameter, and optimizers see the same parameters with and without the fold."""

    @staticmethod
    def forward(ctx, x, parameter):
        ctx.like = parameter.detach()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros_like(ctx.like)


def put_rows(x: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) with x[b, :, index[b, g]] = rows[b, :, g] where valid[b, g]; the positions of a row of
    ``index`` are distinct. Writes into x (which must be a result nothing else uses) and returns it."""
    return _PutRows.apply(x, rows, index, valid)


def _per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, H, G, K) times weight (H, K, N), head by head -> (B, H, G, N): one product per head with the batch's
    rows side by side (views at batch 1). Broadcasting the weight over the batch instead made its gradient a
    product per batch entry and a sum over them, one more kernel at G rows."""
    b, h, g, k = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(h, b * g, k), weight)
    return out.view(h, b, g, weight.shape[-1]).transpose(0, 1)


class GlobalTokens:
    """Where the global tokens are, in forms both global parts use.

    global_mask (B, T) bool, restricted to real tokens (global_mask & padding_mask). ``index`` (B, G):
    positions of each row's global tokens in order, padded with arbitrary positions where ``valid`` (B, G) is
    False. G is the largest number of global tokens in a row (may be 0), read back from the GPU; or ``size``,
    which no row may exceed: then nothing is read back (a CUDA graph can record it), and a row with more global
    tokens is a ValueError, or while a graph records a device-side assertion (checked at every replay)."""

    def __init__(self, global_mask: torch.Tensor, size: int | None = None):
        count = global_mask.sum(dim=1)  # (B,)
        if size is None:
            num = int(count.max()) if global_mask.numel() else 0  # the one data-dependent size
        else:
            num = min(size, global_mask.shape[1])
            message = f"a row has more global tokens than max_global_tokens={size}"
            if capturing():
                torch._assert_async((count <= size).all(), message)
            elif global_mask.numel() and (most := int(count.max())) > size:
                raise ValueError(f"{message} ({most}): raise `max_global_tokens` in the config.")
        # stable sort puts global positions first, in order
        self.index = torch.argsort((~global_mask).to(torch.int8), dim=1, stable=True)[:, :num]
        self.valid = torch.arange(num, device=global_mask.device) < count[:, None]
        self.mask = global_mask
        self.key_masks: dict = {}  # the layers' global-key masks by their settings, built once
        self._slots: dict = {}

    @property
    def slots(self) -> torch.Tensor:
        """(B, T) int32: each global token's slot in ``index``, -1 elsewhere (for the kernels; built once per
        mode: one built under inference mode could not be saved for a backward pass)."""
        mode = torch.is_inference_mode_enabled()
        if mode not in self._slots:
            b, t = self.mask.shape
            ids = torch.arange(self.index.shape[1], dtype=torch.int32, device=self.mask.device).expand(b, -1)
            ids = torch.where(self.valid, ids, -1)  # padded slots point at positions that are not global
            slots = torch.full((b, t), -1, dtype=torch.int32, device=self.mask.device)
            self._slots[mode] = slots.scatter_(1, self.index, ids)
        return self._slots[mode]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, H, G, D) at the global positions."""
        idx = self.index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
        return x.gather(2, idx)


class SlidingWindowSelfAttention(nn.Module):
    """Multi-head Longformer self-attention: sliding window (dilated per head) plus symmetric global attention.

    Args:
        hidden_size: width of the input and output.
        num_heads: heads; head size is hidden_size / num_heads.
        window: window size w (even): w / 2 tokens on each side, or w before when causal.
        dilation: one dilation for every head, or a list with one per head.
        causal: autoregressive masking (also of global attention).
        dropout: dropout on attention probabilities.
        bias: biases in the projections (True in Longformer/RoBERTa).
        layer_idx: the layer this module sits in (its slot in a `LayerStateCache`).
    """

    def __init__(self, hidden_size: int, num_heads: int, window: int, dilation: int | list[int] = 1,
                 causal: bool = False, dropout: float = 0.0, bias: bool = True, layer_idx: int = 0):
        super().__init__()
        if window < 2 or window % 2:
            raise ValueError(f"`window`={window!r} is not valid: expected an even integer >= 2.")
        dilation = list(dilation) if isinstance(dilation, (list, tuple)) else [dilation] * num_heads
        if len(dilation) != num_heads or any(d < 1 for d in dilation):
            raise ValueError(f"`dilation`={dilation!r} is not valid: expected one integer >= 1 or {num_heads} of them.")
        self.num_heads, self.window, self.dilation = num_heads, window, dilation
        self.causal, self.layer_idx = causal, layer_idx
        # Heads grouped by dilation (static): [(d, head indices)]; one group needs no head shuffling.
        groups: dict[int, list[int]] = {}
        for head, d in enumerate(dilation):
            groups.setdefault(d, []).append(head)
        # a group of consecutive heads is taken as a slice (a view; indexing by a list copies, and its backward
        # is an accumulating scatter); the concatenated groups need reordering only when some are not in order
        self.head_groups = [(d, slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1))
                             else heads) for d, heads in groups.items()]
        order = [head for heads in groups.values() for head in heads]
        self.head_order = (None if order == list(range(num_heads))
                           else sorted(range(num_heads), key=order.__getitem__))  # inverse permutation of `order`
        self._constants: dict[tuple, torch.Tensor] = {}  # `_on_device`
        for name in ("query", "key", "value", "query_global", "key_global", "value_global", "output"):
            setattr(self, name, nn.Linear(hidden_size, hidden_size, bias=bias))
        self.dropout = nn.Dropout(dropout)

    def covers(self, length: int) -> bool:
        """Whether every window holds the whole sequence of ``length`` tokens (no dilation gaps)."""
        reach = self.window if self.causal else self.window // 2
        return self.dilation == [1] * self.num_heads and reach >= length - 1

    def _window_part(self, query, key, value, key_ok, need_lse: bool = True):
        """Window attention of every head, grouped by dilation; key_ok (B, T) bool or None (every key may be
        attended). Returns (out (B, H, T, D), lse (B, H, T)); without ``need_lse``, lse may be None."""
        if flex_can_run(query, self.dropout):
            attend = functools.partial(flex_window_attend, need_lse=need_lse)
        else:
            attend = functools.partial(sliding_window_attend, dropout=self.dropout)
            if key_ok is None:
                key_ok = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
        if len(self.head_groups) == 1:
            return attend(query, key, value, self.window, self.dilation[0], self.causal, key_ok)
        parts = []
        for d, heads in self.head_groups:
            heads = heads if isinstance(heads, slice) else self._on_device(heads, query.device)
            parts.append(attend(query[:, heads], key[:, heads], value[:, heads], self.window, d, self.causal, key_ok))
        out, lse = (None if parts[0][i] is None else torch.cat([p[i] for p in parts], dim=1) for i in (0, 1))
        if self.head_order is not None:
            order = self._on_device(self.head_order, out.device)
            out, lse = out[:, order], None if lse is None else lse[:, order]
        return out, lse

    def _on_device(self, values: list[int], device: torch.device) -> torch.Tensor:
        """A list of ints (head indices, dilations) as a tensor on ``device``, made once per device: indexing by a
        Python list, or `torch.tensor` of one, copies it from host memory at every call, which a CUDA graph cannot
        record (`training.cuda_graph`). One made under inference mode cannot be saved for a backward pass, so that
        mode is part of the key. Inside torch.compile the tensor is a constant of the graph instead (the cache
        lookup would break the graph)."""
        if torch.compiler.is_compiling():
            return torch.tensor(values, device=device)
        key = (tuple(values), str(device), torch.is_inference_mode_enabled())
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, device=device)
        return self._constants[key]

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None,
                cache: LayerStateCache | None = None,
                global_mask: torch.Tensor | GlobalTokens | None = None) -> torch.Tensor:
        """hidden_states (B, T, hidden); padding_mask (B, T_all) bool, True for real tokens, covering the cached
        positions too when decoding; global_mask (B, T) bool, True for global tokens, or the `GlobalTokens` of
        such a mask and the padding mask (a model builds it once for all its layers); None: no global tokens.
        Returns (B, T, hidden)."""
        b, t, _ = hidden_states.shape
        decoding = cache is not None and cache.has(self.layer_idx)
        real = (torch.ones(b, t, dtype=torch.bool, device=hidden_states.device) if padding_mask is None
                else padding_mask.bool())
        glob = global_mask
        if global_mask is not None and not isinstance(global_mask, GlobalTokens) and not decoding:
            glob = GlobalTokens(global_mask.bool() & real)
        g_projected = None
        if glob is not None and not decoding and self._projects_global_rows(hidden_states, glob):
            hidden_states, projected, g_projected = self._project_with_global_rows(hidden_states, glob)
        else:
            projected = project(hidden_states, [self.query, self.key, self.value])
        query, key, value = (split_heads(x, self.num_heads) for x in projected)  # (B, H, T, D)
        if decoding:
            if isinstance(global_mask, GlobalTokens):
                global_mask = global_mask.mask
            out = self._decode(query, key, value, padding_mask, cache, global_mask)
            return self.output(merge_heads(out))

        if cache is not None:  # prefill: keep what the decoding steps read
            is_global = torch.zeros_like(real) if glob is None else glob.mask
            for name, tensor, dim in (("key", key, 2), ("value", value, 2), ("global", is_global, 1)):
                cache.append(self.layer_idx, name, tensor, seq_dim=dim)
        if glob is None and self.covers(t):  # the window holds every key: exactly full attention
            dropout_p = self.dropout.p if self.training else 0.0
            out = full_attend(query, key, value, None if padding_mask is None else real, self.causal, dropout_p)
            return self.output(merge_heads(out))
        if glob is None:
            out, _ = self._window_part(query, key, value, None if padding_mask is None else real, need_lse=False)
            return self.output(merge_heads(out))

        key_ok = None if padding_mask is None else real
        out = self._with_global_tokens(hidden_states, query, key, value, key_ok, glob, g_projected)
        return self.output(merge_heads(out))

    @torch.compiler.disable
    def _with_global_tokens(self, hidden_states, query, key, value, key_ok, glob: GlobalTokens,
                            g_projected: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Attention of every query when some tokens are global: its window and the global keys, and for global
        queries every real key; key_ok (B, T) bool, True for real tokens, or None when there is no padding;
        g_projected: the global tokens' rows of the query/key/value projection, (B, G, hidden) each, where the
        caller took them (`_project_with_global_rows`), else None. Returns (B, H, T, D).

        Global keys stay in the windows (so that without padding the window part needs no key mask, which made
        its FlexAttention kernels several times slower); a query's global part takes only the global keys outside
        its window.

        Inside torch.compile this runs eagerly (a graph break; the number of global tokens is data anyway):
        compiled by inductor, its input gradients came out wrong on an H200 (torch 2.11) with FlexAttention and
        with the readable window part alike, and on CPU through `unfold` (see `_windows`)."""
        b, t, _ = hidden_states.shape
        h, d_head, num = self.num_heads, query.shape[-1], glob.index.shape[1]
        scale = 1.0 / math.sqrt(d_head)
        # query is a view of the fused q/k/v projection: one contiguous copy serves the window part (FlexAttention
        # takes contiguous inputs) and the global keys' part, and what they keep for backward does not hold on to
        # the keys and values too (read through its strides, the kernel kept the whole (T, 3 * hidden) buffer)
        query = query.contiguous()
        out, lse = self._window_part(query, key, value, key_ok)
        # The global tokens' own inputs, from which their keys and values (ordinary projections) and queries
        # (global projections) are projected again: G rows each, and one gather whose backward is a (T, hidden)
        # scatter, where gathering the projected keys and values cost one per tensor; where the global-queries
        # kernel runs, into that kernel's input gradient, in place (`rows_beside_inputs`).
        # A key or value map that does more than its weights say (hooks, LoRA dropout, offloading: see
        # `anything_watching`) is called once, on every row, and the global rows are gathered from its output.
        kernels = self._global_kernels_take(query, num)
        folded_kernel = kernels and self._folded_kernel_runs(num)
        if folded_kernel:
            g_hidden, hidden_states = rows_beside_inputs(hidden_states, glob.index)
        else:
            g_hidden = hidden_states.gather(1, glob.index[:, :, None].expand(-1, -1, hidden_states.shape[-1]))

        def heads(x):  # (B, G, H * D) -> (B, H, G, D)
            return x.view(b, num, h, d_head).transpose(1, 2)

        compute = product_dtype(hidden_states)
        few_rows = self._few_rows(hidden_states, kernels, inputs_cast=g_projected is not None)
        if few_rows is not None:  # (inputs cast by `_project_with_global_rows` go back to the weights' dtype)
            g_hidden = g_hidden.to(self.query_global.weight.dtype)
        with few_rows or contextlib.nullcontext():
            if g_projected is not None:
                g_key, g_value = heads(g_projected[1]), heads(g_projected[2])
                g_query = heads(self.query_global(g_hidden))
            elif anything_watching(self.key) or anything_watching(self.value):
                g_key, g_value, g_query = glob.gather(key), glob.gather(value), heads(self.query_global(g_hidden))
            else:
                rows = project(g_hidden, [self.key, self.value, self.query_global], few_rows=True)
                g_key, g_value, g_query = map(heads, rows)
            # Global queries attend to every real key with the global projections: (B, H, G, D)
            g_out = self._global_queries(hidden_states, g_query, key_ok, glob, scale, folded_kernel, compute)
        # Every query also attends to the global keys outside its window (ordinary projections); each global
        # token takes its row of g_out, written at its position
        if kernels:
            before, after = (self.window, 0) if self.causal else (self.window // 2, self.window // 2)
            dilation = self._on_device(self.dilation, query.device)
            return merge_global_keys(query, out, lse, g_key, g_value, g_out, glob.index, glob.valid, glob.slots,
                                     dilation, before, after, self.causal, scale)
        # (B, H, T, G) scores. The mask is the same for every layer with these settings; one built under inference
        # mode could not be saved for a backward pass, so that mode is part of the key.
        settings = (self.window, tuple(self.dilation), self.causal, t, torch.is_inference_mode_enabled())
        if settings not in glob.key_masks:
            glob.key_masks[settings] = self._global_key_mask(glob, t)
        out_g, lse_g = few_keys_dense_attend(query, g_key, g_value, glob.key_masks[settings], scale, self.dropout)
        out = combine_softmax(out, lse, out_g, lse_g)
        return put_rows(out, g_out, glob.index, glob.valid)  # positions are unique

    def _global_kernels_run(self, tensor: torch.Tensor) -> bool:
        """Whether the global parts run as Triton kernels (`global_keys_kernel`, `global_queries_kernel`): on
        CUDA with fast paths on (see `flex.use_fast_path`) and no attention dropout active."""
        dropout_active = self.dropout.training and self.dropout.p > 0
        return not dropout_active and kernel_available(tensor) and use_fast_path(tensor, flex=False)

    def _few_rows(self, hidden_states: torch.Tensor, kernels: bool, inputs_cast: bool):
        """Where the global tokens' few-row products run: None, as the caller's mode says; or, with the kernels,
        under autocast, and with the inputs in the weights' dtype or cast from it by `_project_with_global_rows`
        (``inputs_cast``: then the global queries run folded, through the kernel), a context without autocast, in
        which they run in the weights' dtype: autocast would cast every weight and bias (a kernel each, forward
        and backward: more launches than the products themselves, at G rows); the kernels cast their tiles to the
        autocast dtype in registers. Inputs in another dtype keep autocast: the global queries' readable path
        multiplies them with the weights."""
        device = hidden_states.device.type
        if (kernels and torch.is_autocast_enabled(device)
                and (inputs_cast or hidden_states.dtype == self.query_global.weight.dtype)):
            return torch.autocast(device, enabled=False)
        return None

    def _global_kernels_take(self, tensor: torch.Tensor, num: int) -> bool:
        """Whether the global parts of ``num`` global tokens run as the Triton kernels (`_global_kernels_run`, and
        no more global tokens than the keys kernel takes)."""
        return self._global_kernels_run(tensor) and num <= MAX_GLOBAL

    def _folded_kernel_runs(self, num: int) -> bool:
        """Whether the global queries of ``num`` global tokens run folded through `global_queries_kernel` (given
        that the global kernels run: see `_global_kernels_take`)."""
        return self.num_heads * num <= MAX_ROWS and not self._global_maps_watched()

    def _projects_global_rows(self, hidden_states: torch.Tensor, glob: GlobalTokens) -> bool:
        """Whether `_project_with_global_rows` projects the inputs: where the global-queries kernel runs folded
        and the q/k/v maps are plain (`projections.fuses`)."""
        num = glob.index.shape[1]
        return (self._global_kernels_take(hidden_states, num) and self._folded_kernel_runs(num)
                and fuses(hidden_states, [self.query, self.key, self.value], few_rows=True))

    @torch.compiler.disable
    def _project_with_global_rows(self, hidden_states: torch.Tensor, glob: GlobalTokens):
        """The q/k/v projection as one product, and the global tokens' rows of it, whose gradient is added into
        the product's in place (`rows_beside_inputs`): the global keys and values need no product of their own,
        nor their weights' gradients a sum with the projection's. Under autocast, inputs wider than its dtype are
        cast to it first, and that cast is also what the global-queries kernel reads: the kernel's input gradient
        then adds to the projection's in autocast's dtype (on an H200 at 16K the fp32 sum took 25 us per layer),
        and it reads half the bytes. Returns (the inputs as the kernel reads them, [query, key, value] (B, T,
        hidden) each, the global rows [query, key, value] (B, G, hidden) each)."""
        linears = [self.query, self.key, self.value]
        hidden_states = hidden_states.to(product_dtype(hidden_states))
        projected = nn.functional.linear(hidden_states, *concatenated_weights(linears))
        g_projected, projected = rows_beside_inputs(projected, glob.index)
        return hidden_states, split_outputs(projected, linears), split_outputs(g_projected, linears)

    def _global_maps_watched(self) -> bool:
        """Whether the global key or value map does more than its weights say (`anything_watching`): then it is
        applied to every token as written, not folded into the global queries."""
        return anything_watching(self.key_global) or anything_watching(self.value_global)

    def _global_queries(self, hidden_states, g_query, key_ok, glob: GlobalTokens, scale, kernels: bool,
                        compute: torch.dtype) -> torch.Tensor:
        """The global queries' attention over every real (and, when causal, not later) key with the global key
        and value maps: g_query (B, H, G, D), key_ok (B, T) bool or None (no padding); ``kernels``: the maps
        folded, through `global_queries_kernel` (the caller checks that it takes these rows and maps), with
        products in ``compute``. Returns (B, H, G, D).

        The maps are folded into the G queries instead of applied to the T tokens: with the head's rows W_k, b_k
        and W_v, b_v of the maps, q . (W_k x_t + b_k) = (q W_k) . x_t + q . b_k, whose last term is the same for
        every key and leaves the softmax unchanged (b_k gets its exact gradient, zero), and
        sum_t p_t (W_v x_t + b_v) = W_v (sum_t p_t x_t) + b_v. So the scores are (G, hidden) queries against the
        inputs themselves: the (T, 2 * hidden) projection of every token, its backward and the (T, hidden) keys
        and values kept for it are not needed. A map that does more than its weights (see `anything_watching`)
        is applied to every token as written."""
        b, h, num, d_head = g_query.shape
        t, hidden = hidden_states.shape[1:]
        watched = self._global_maps_watched()
        if not watched:
            folded = _per_head(g_query, self.key_global.weight.view(h, d_head, hidden))  # (B, H, G, hidden)
        if kernels:
            # the inputs are read as they are, in their own dtype
            mixed = global_queries_attend(folded.reshape(b, h * num, hidden), hidden_states, key_ok, glob.index,
                                          self.causal, scale, compute)
            return self._global_values(mixed.view(b, h, num, hidden))
        allowed = torch.ones(b, t, dtype=torch.bool, device=g_query.device) if key_ok is None else key_ok
        allowed = allowed[:, None, None, :]  # (B, 1, 1, T)
        if self.causal:
            allowed = allowed & (torch.arange(t, device=g_query.device) <= glob.index[:, None, :, None])
        if watched:
            g_key, g_value = (split_heads(x, h)  # (B, H, T, D)
                              for x in project(hidden_states, [self.key_global, self.value_global]))
            return few_queries_attend(g_query, g_key, g_value, allowed, scale, self.dropout)[0]
        # cast once for both products (autocast would cast for each)
        inputs = hidden_states.to(product_dtype(hidden_states))[:, None]  # (B, 1, T, hidden): keys and values alike
        allowed = allowed.expand(b, h, num, t).reshape(b, 1, h * num, t)
        mixed, _ = few_queries_attend(folded.reshape(b, 1, h * num, hidden), inputs, inputs, allowed, scale,
                                      self.dropout)
        return self._global_values(mixed.view(b, h, num, hidden))

    def _global_values(self, mixed: torch.Tensor) -> torch.Tensor:
        """(B, H, G, hidden) probability-weighted inputs -> (B, H, G, D) through the global value map's heads."""
        h, d_head = self.num_heads, self.value_global.out_features // self.num_heads
        g_out = _per_head(mixed, self.value_global.weight.view(h, d_head, -1).transpose(1, 2))
        if self.value_global.bias is not None:
            g_out = g_out + self.value_global.bias.view(h, 1, d_head)
        # the key map's bias added q . b_k to every score of a query: folded away, its gradient is an exact zero
        return g_out if self.key_global.bias is None else _ZeroGradientTo.apply(g_out, self.key_global.bias)

    def _global_key_mask(self, glob: GlobalTokens, length: int) -> torch.Tensor:
        """(B, 1 or H, T, G) bool: which global keys each query attends to outside its window (and, when causal,
        not after it)."""
        positions = torch.arange(length, device=glob.index.device)
        offset = glob.index[:, None, None, :] - positions[:, None]  # (B, 1, T, G): key position - query position
        dilation = self.dilation[0]  # one for every head: the mask stays (B, 1, T, G)
        if len(self.head_groups) > 1:
            dilation = self._on_device(self.dilation, offset.device)[:, None, None]  # (H, 1, 1)
        before, after = (self.window, 0) if self.causal else (self.window // 2, self.window // 2)
        in_window = (offset % dilation == 0) & (offset >= -before * dilation) & (offset <= after * dilation)
        allowed = glob.valid[:, None, None, :] & ~in_window
        if self.causal:
            allowed = allowed & (offset <= 0)
        return allowed

    def _decode(self, query, key, value, padding_mask, cache, global_mask):
        """Causal attention of the Q new positions over all T cached and new keys (incremental decoding): one
        (Q, T) mask per head, which is linear in T per step. New tokens cannot be global here (their global
        attention would need the global keys and values of every earlier token, which are not cached)."""
        q_len = query.shape[2]
        if global_mask is not None and bool(global_mask.any()):
            raise ValueError("Global attention on new tokens is not supported in cached decoding: pass "
                             "`use_cache=False`, or give global attention to tokens of the prompt only.")
        key = cache.append(self.layer_idx, "key", key, seq_dim=2)  # (B, H, T, D)
        value = cache.append(self.layer_idx, "value", value, seq_dim=2)
        new_global = torch.zeros(query.shape[0], q_len, dtype=torch.bool, device=query.device)
        is_global = cache.append(self.layer_idx, "global", new_global, seq_dim=1)  # (B, T)
        t = key.shape[2]
        dilations = self._on_device(self.dilation, query.device)[:, None, None]  # (H, 1, 1)
        positions = torch.arange(t, device=query.device)
        offset = positions[t - q_len:, None] - positions[None, :]  # (Q, T): how far back each key is
        in_window = (offset >= 0) & (offset <= self.window * dilations) & (offset % dilations == 0)
        real = (torch.ones_like(is_global) if padding_mask is None else padding_mask.bool())[:, None, None, :]
        key_global = is_global[:, None, None, :]
        allowed = real & ((in_window & ~key_global) | (key_global & (offset >= 0)))  # (B, H, Q, T)
        out, _ = dense_attend(query, key, value, allowed, 1.0 / math.sqrt(query.shape[-1]), self.dropout)
        return out
