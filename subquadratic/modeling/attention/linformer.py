"""Linformer self-attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values (B, H, T, D) are shortened along the sequence axis to k positions before attention, so the scores
are T x k instead of T x T: time and memory grow linearly with the sequence length. The module is built for a
maximum length n; the learned projections E, F (k x n) are tied to it.

Padding never reaches the outputs of real tokens: padded keys and values are removed (zeroed, or excluded from
pooling) before projecting, and an input of length T < n uses only the first T columns of E and F (as the paper's
reference implementation in fairseq does), so the projection of a sequence does not depend on how much padding
follows it. Pooled slots that cover no real token are masked out of the softmax. No rescaling is applied for
T < n (a shorter input sums fewer columns of E); this keeps outputs independent of padding, which a rescale by
the padded length would break.

Linformer attention is bidirectional: every projected key mixes all positions, so causal masking is impossible.

Two paths compute the attention of the T queries over the k projected keys (chosen by `flex.fast_paths`, CUDA by
default): the readable one (`dense_attend`: fp32 scores and probabilities, the reference) and a fast one through
`scaled_dot_product_attention` (flash or memory-efficient kernels: the T x k scores are never stored, and with no
empty pooled slot no mask is passed, so the flash kernel can run). Where one projection serves all heads and mixes
positions linearly (every kind but "max"), the fast path also projects the hidden states before the key and value
maps, P(x W^T + b) = P(x) W^T + P(1) b, so those maps run on k' rows instead of T.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...configuration.linformer import PROJECTION_KINDS, SHARING_MODES
from .dense import dense_attend, few_keys_attend
from .flex import use_fast_path
from .masking import merge_heads, split_heads
from .projections import anything_watching, product_dtype


class SequenceProjection(nn.Module):
    """Shortens (B, H, T, D) to (B, H, k', D) along the sequence axis, for T <= n.

    Kinds: "linear" (learned E of shape (k, n); k' = k), "mean" / "max" pooling and "conv" (a learned strided
    convolution: one filter of n/k weights applied to every feature) with kernel = stride = n/k, where
    k' = ceil(T / (n/k)) windows cover the input.

    Args:
        kind: one of PROJECTION_KINDS.
        max_length: n, the longest input.
        projected_length: k (<= n; a divisor of n unless kind is "linear").
        num_heads: separate weights for this many heads (1: one set shared by all heads).
    """

    def __init__(self, kind: str, max_length: int, projected_length: int, num_heads: int = 1):
        super().__init__()
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"projection kind {kind!r} is not valid: expected one of {list(PROJECTION_KINDS)}.")
        if not 0 < projected_length <= max_length:
            raise ValueError(f"projected length k={projected_length} must be in [1, n={max_length}].")
        if kind != "linear" and max_length % projected_length:
            raise ValueError(f"projection kind {kind!r} pools with kernel = stride = n/k, so k={projected_length} "
                             f"must divide n={max_length}.")
        self.kind, self.max_length, self.projected_length = kind, max_length, projected_length
        self.stride = max_length // projected_length
        shape = {"linear": (num_heads, projected_length, max_length), "conv": (num_heads, self.stride)}.get(kind)
        self.weight = None if shape is None else nn.Parameter(torch.empty(shape))
        if self.weight is not None:
            nn.init.normal_(self.weight, std=self.init_std)

    @property
    def shared_linear(self) -> bool:
        """Whether this projection mixes positions linearly with one weight for all heads, so that it commutes with
        the key and value maps (see `project_inputs_first`)."""
        return self.kind != "max" and (self.weight is None or self.weight.shape[0] == 1)

    @property
    def init_std(self) -> float:
        """1 / sqrt(fan-in): a projected key is a weighted sum of fan-in keys, and keeps their scale."""
        return 1.0 / math.sqrt(self.max_length if self.kind == "linear" else self.stride)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """x (B, H, T, D); padding_mask (B, T) bool, True for real tokens.

        Returns (projected (B, H, k', D), slot_mask): for the window kinds with a padding mask, slot_mask (B, 1, 1,
        k') is False for windows that cover no real token (to be masked out of the softmax); None for "linear",
        whose every slot mixes the whole input, and without padding, where every window holds a real token."""
        b, h, t, d = x.shape
        keep = None if padding_mask is None else padding_mask.bool()[:, None, :, None]  # (B, 1, T, 1)
        if self.kind == "linear":
            if keep is not None:
                x = x * keep
            # weight (P, k, T) with P in {1, H}: out[b, h] = E_h[:, :T] @ x[b, h]
            weight = self.weight[:, :, :t]
            if weight.shape[0] == 1:
                return torch.einsum("kt,bhtd->bhkd", weight[0], x), None
            return torch.einsum("hkt,bhtd->bhkd", weight, x), None

        # windows of `stride` positions: pad T to a whole number of windows; the added positions are not real
        s = self.stride
        windows = -(-t // s)
        extra = windows * s - t
        if keep is None:
            keep = torch.ones(1, 1, t, 1, dtype=torch.bool, device=x.device)
        x = nn.functional.pad(x, (0, 0, 0, extra)).view(b, h, windows, s, d)
        keep = nn.functional.pad(keep, (0, 0, 0, extra), value=False).view(keep.shape[0], 1, windows, s, 1)
        count = keep.sum(dim=3)  # (B, 1, k', 1): real tokens per window
        slot_mask = None if padding_mask is None else (count > 0).view(count.shape[0], 1, 1, windows)
        if self.kind == "max":
            out = x.masked_fill(~keep, torch.finfo(x.dtype).min).amax(dim=3)
            return out.masked_fill(count == 0, 0.0), slot_mask
        x = x * keep
        if self.kind == "mean":
            # divide by the real tokens of each window, not by the window size
            return x.sum(dim=3) / count.clamp(min=1).to(x.dtype), slot_mask
        # conv: out[b, h, j] = sum_i w_h[i] x[b, h, j*s + i], weight (P, s) broadcast over heads and features
        return torch.einsum("bhjsd,hs->bhjd", x, self.weight.expand(h, s)), slot_mask


def project_inputs_first(pairs: list[tuple[SequenceProjection, nn.Linear]], hidden_states: torch.Tensor,
                         padding_mask: torch.Tensor | None, heads: int):
    """[P(m(x)) for (P, m) in pairs] computed as P(x) W^T + P(1) b, for `shared_linear` projections P: the maps run
    on the k' projected rows instead of the T input rows, and the (B, T, H*D) keys/values are never formed.
    Learned ("linear") projections are applied together, their (k, T) matrices stacked into one product (one
    shared by several maps is applied once); a key and a value pair of them without padding, by
    `_LearnedKeysValues`.

    The maps' and projections' weights are read directly: they must be plain modules, with no hooks, wrappers or
    offloading (`projections.anything_watching`; the caller checks). hidden_states (B, T, hidden). Returns
    ([(B, heads, k', D) per pair], slot_mask of the first projection as `SequenceProjection` gives it)."""
    projections = list(dict.fromkeys(projection for projection, _ in pairs))  # distinct, in order
    if any(projection.kind != "linear" for projection in projections):
        ones = hidden_states.new_ones(1, 1, hidden_states.shape[1], 1)
        applied = {}  # projection -> (P(x) (B, k', hidden), P(1) (B or 1, k', 1): the bias's share per slot, slots)
        for projection in projections:
            projected, slots = projection(hidden_states[:, None], padding_mask)
            applied[projection] = projected[:, 0], projection(ones, padding_mask)[0][:, 0], slots
        outs = [_map_projected(linear.weight, linear.bias, *applied[projection][:2]) for projection, linear in pairs]
        return [split_heads(out, heads) for out in outs], applied[pairs[0][0]][2]
    if padding_mask is None and _LearnedKeysValues.takes(pairs):
        (key_projection, key_map), (value_projection, value_map) = pairs
        # in autocast's dtype (the caller casts them unless the query map is watched)
        outs = _LearnedKeysValues.apply(hidden_states.to(product_dtype(hidden_states)), key_projection.weight,
                                        value_projection.weight, key_map.weight, key_map.bias, value_map.weight,
                                        value_map.bias, heads)
        return list(outs), None
    t = hidden_states.shape[1]
    weight = torch.cat([projection.weight[0, :, :t] for projection in projections])  # (sum k, T)
    if padding_mask is None:
        projected = torch.matmul(weight, hidden_states)  # (B, sum k, hidden)
        share = weight.sum(dim=-1)[None, :, None]  # P(1): (1, sum k, 1)
    else:
        keep = padding_mask.to(hidden_states.dtype)  # padded positions contribute nothing
        projected = torch.matmul(weight, hidden_states * keep[..., None])
        share = torch.matmul(keep, weight.t())[..., None]  # (B, sum k, 1)
    sizes = [projection.projected_length for projection in projections]
    starts = dict(zip(projections, [sum(sizes[:i]) for i in range(len(sizes))]))

    def rows(projection):  # the projection's rows of `projected`
        return slice(starts[projection], starts[projection] + projection.projected_length)

    return [split_heads(_map_projected(linear.weight, linear.bias, projected[:, rows(p)], share[:, rows(p)]), heads)
            for p, linear in pairs], None


class _LearnedKeysValues(torch.autograd.Function):
    """The keys and values of `project_inputs_first` for two learned projections E, F (1, k, n) and the key and
    value maps (W_k, b_k), (W_v, b_v), without padding: for inputs x (B, T, width), T <= n, and E', F' the first T
    columns, K = E' x W_k^T + E' 1 b_k^T and V = F' x W_v^T + F' 1 b_v^T, in x's dtype (the parameters are cast to
    it, as autocast casts them; E' 1 is summed from the cast E' in fp32), each as (B, heads, k, out / heads).

    Not differentiable twice. Both are batched products over the pair (key, value), with the backward pass written
    out: autograd on the
    same formula dispatched about 31 operations per layer and training step (the slices of the parameters and of
    one product over both pairs, copies and sums of the bias terms), this 22; at 4K tokens on an H200 a recorded
    step's time follows its kernel launches more than their work (BENCHMARKS.md)."""

    @staticmethod
    def takes(pairs) -> bool:
        """Whether it computes these (SequenceProjection, nn.Linear) pairs: a key and a value pair of learned
        projections with one weight for all heads, of one length k, and maps of one shape, with biases or not."""
        if len(pairs) != 2:
            return False
        (key_projection, key_map), (value_projection, value_map) = pairs
        return (key_projection.kind == value_projection.kind == "linear"
                and key_projection.weight.shape == value_projection.weight.shape
                and key_map.weight.shape == value_map.weight.shape
                and (key_map.bias is None) == (value_map.bias is None))

    @staticmethod
    def forward(ctx, hidden, key_projection, value_projection, key_weight, key_bias, value_weight, value_bias,
                heads):
        b, t, width = hidden.shape
        dtype, k, n = hidden.dtype, key_projection.shape[1], key_projection.shape[2]
        projection = torch.cat([key_projection[0, :, :t], value_projection[0, :, :t]]).to(dtype)  # (2k, T)
        rows = torch.bmm(projection.expand(b, -1, -1), hidden)  # (B, 2k, width): P(x)
        rows = rows.view(b, 2, k, width).transpose(0, 1).reshape(2, b * k, width)  # a view at B = 1
        weight = torch.stack([key_weight, value_weight]).to(dtype)  # (2, out, width)
        share = bias = None
        if key_bias is None:
            mapped = torch.bmm(rows, weight.transpose(1, 2))
        else:
            share = projection.sum(dim=-1, dtype=torch.float32).view(2, 1, k, 1)  # P(1)
            bias = torch.stack([key_bias, value_bias]).float()  # (2, out)
            terms = (share * bias[:, None, None]).expand(2, b, k, -1).reshape(2, b * k, -1)  # P(1) b^T
            mapped = torch.baddbmm(terms.to(dtype), rows, weight.transpose(1, 2))  # (2, B * k, out)
        ctx.save_for_backward(hidden, projection, rows, weight, share, bias)
        ctx.sizes, ctx.parameter_dtype = (b, t, k, n), key_weight.dtype
        mapped = mapped.view(2, b, k, heads, -1).transpose(2, 3)  # (2, B, H, k, D)
        return mapped[0], mapped[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_key, grad_value):
        hidden, projection, rows, weight, share, bias = ctx.saved_tensors
        (b, t, k, n), dtype = ctx.sizes, weight.dtype
        # (B, H, k, D) each (autograd gives zeros for an unused one) -> (2, B * k, out): one copy
        grad = torch.stack([grad_key.transpose(1, 2), grad_value.transpose(1, 2)]).to(dtype).view(2, b * k, -1)
        grad_rows = torch.bmm(grad, weight).view(2, b, k, -1).transpose(0, 1).reshape(b, 2 * k, -1)
        grad_weight = torch.bmm(grad.transpose(1, 2), rows).to(ctx.parameter_dtype)  # (2, out, width)
        grad_projection = torch.bmm(grad_rows, hidden.transpose(1, 2))  # (B, 2k, T)
        grad_projection = grad_projection[0] if b == 1 else grad_projection.sum(dim=0)
        grad_bias = [None, None]
        if bias is not None:
            grad = grad.float()
            grad_share = torch.bmm(grad, bias[..., None]).view(2, b, k)
            grad_share = grad_share[:, 0] if b == 1 else grad_share.sum(dim=1)  # (2, k)
            grad_projection = grad_projection + grad_share.view(2 * k, 1)  # in fp32
            terms = share.view(2, 1, k).expand(2, b, k).reshape(2, 1, b * k)
            grad_bias = list(torch.bmm(terms, grad).view(2, -1).to(ctx.parameter_dtype))
        grad_hidden = torch.bmm(projection.t().expand(b, -1, -1), grad_rows)  # (B, T, width)
        grad_projection = grad_projection.to(ctx.parameter_dtype).view(2, 1, k, t)
        if t < n:  # the columns the input did not reach get none
            grad_projection = nn.functional.pad(grad_projection, (0, n - t))
        return (grad_hidden, grad_projection[0], grad_projection[1], grad_weight[0], grad_bias[0], grad_weight[1],
                grad_bias[1], None)


def _map_projected(weight: torch.Tensor, bias: torch.Tensor | None, projected: torch.Tensor,
                   share: torch.Tensor) -> torch.Tensor:
    """A linear map (weight, bias) applied to projected rows P(x): P(x) W^T + P(1) b (in the dtype of the
    product)."""
    out = nn.functional.linear(projected, weight)
    return out if bias is None else out + (share * bias).to(out.dtype)


class LinformerSelfAttention(nn.Module):
    """Multi-head self-attention over keys and values projected from n to k positions.

    Args:
        hidden_size: width of the input and output.
        num_heads, head_size: heads and their width.
        max_length: n, the longest input (the projections are built for it).
        projected_length: k, projected key/value positions.
        sharing: "none" (E, F per head), "headwise" (one E, F for all heads), "key-value" (one matrix used as E
            and F by all heads) or "layerwise" (the module owns no projection: the caller passes the model-wide
            one to `forward`, so it is stored once).
        projection_kind: "linear", "mean", "max" or "conv" (see `SequenceProjection`).
        dropout: dropout on attention probabilities.
        causal: must be False; present so that a causal request fails clearly instead of silently attending to
            the future.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_size: int, max_length: int, projected_length: int,
                 sharing: str = "none", projection_kind: str = "linear", dropout: float = 0.0, causal: bool = False):
        super().__init__()
        if causal:
            raise ValueError("Linformer attention is bidirectional: each projected key mixes the whole sequence, "
                             "so it cannot be causal (is_decoder / causal must be False).")
        if sharing not in SHARING_MODES:
            raise ValueError(f"sharing {sharing!r} is not valid: expected one of {list(SHARING_MODES)}.")
        self.num_heads, self.max_length, self.sharing = num_heads, max_length, sharing
        self.query = nn.Linear(hidden_size, num_heads * head_size)
        self.key = nn.Linear(hidden_size, num_heads * head_size)
        self.value = nn.Linear(hidden_size, num_heads * head_size)
        self.output = nn.Linear(num_heads * head_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        # E (keys) and F (values); "key-value" uses E for both, "layerwise" gets its projection in forward
        self.key_projection = self.value_projection = None
        if sharing != "layerwise":
            per_head = num_heads if sharing == "none" else 1
            self.key_projection = SequenceProjection(projection_kind, max_length, projected_length, per_head)
            if sharing != "key-value":
                self.value_projection = SequenceProjection(projection_kind, max_length, projected_length, per_head)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None,
                shared_projection: SequenceProjection | None = None) -> torch.Tensor:
        """hidden_states (B, T, hidden) with T <= n; padding_mask (B, T) bool, True for real tokens;
        shared_projection: the model-wide projection, needed (only) when sharing is "layerwise".
        Returns (B, T, hidden)."""
        length = hidden_states.shape[1]
        if length > self.max_length:
            raise ValueError(f"Linformer attention takes at most n={self.max_length} positions (its projections "
                             f"are built for n); got a sequence of length {length}.")
        if self.sharing == "layerwise":
            if shared_projection is None:
                raise ValueError("sharing='layerwise' needs the model-wide `shared_projection` in forward.")
            key_projection = value_projection = shared_projection
        else:
            key_projection = self.key_projection
            value_projection = self.value_projection or key_projection
        fast = use_fast_path(hidden_states, flex=False)  # SDPA: any torch, with a CPU backward
        # projecting first reads the maps' and projections' weights: only where calling them does no more
        # (hooks, wrappers, accelerate's offloading: `anything_watching`); otherwise they are called as written
        watched = (any(anything_watching(m) for m in (self.key, self.value))
                   or any(anything_watching(p, SequenceProjection) for p in (key_projection, value_projection)))
        inputs_first = fast and key_projection.shared_linear and value_projection.shared_linear and not watched
        if inputs_first and not anything_watching(self.query):
            # both products of the inputs (the query map, the projection) take them in autocast's dtype: cast once
            hidden_states = hidden_states.to(product_dtype(hidden_states))
        query = split_heads(self.query(hidden_states), self.num_heads)  # (B, H, T, D)
        if inputs_first:
            (key, value), slots = project_inputs_first([(key_projection, self.key), (value_projection, self.value)],
                                                       hidden_states, padding_mask, self.num_heads)  # (B, H, k', D)
        else:
            key, slots = key_projection(split_heads(self.key(hidden_states), self.num_heads), padding_mask)
            value, _ = value_projection(split_heads(self.value(hidden_states), self.num_heads), padding_mask)
        if fast:
            dropout_p = self.dropout.p if self.training else 0.0
            out = few_keys_attend(query, key, value, None if slots is None else slots.flatten(1), dropout_p)
        else:
            # scores (B, H, T, k'): softmax in fp32 over the projected positions, empty pooled slots masked
            out, _ = dense_attend(query, key, value, slots, 1.0 / math.sqrt(query.shape[-1]), self.dropout)
        return self.output(merge_heads(out))
