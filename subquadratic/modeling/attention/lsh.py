"""LSH self-attention (Reformer, Kitaev et al. 2020, section 2).

Queries and keys share one projection; keys are the unit-normalised queries. Each hashing round draws a random
rotation R and puts vector x in bucket argmax([xR; -xR]). The sequence is sorted by (bucket, position) and cut
into chunks of `chunk_length`; each chunk attends to itself and the chunk before it, and a query attends only to
keys of its own bucket. A token attends to itself only when nothing else is allowed. Rounds are combined by their
log-sum-exp weights.

Causal attention here is exactly causal: besides masking later positions, a query attends to at most the
`chunk_length` nearest earlier keys of its bucket (always inside its window). Which keys those are depends only on
earlier tokens, so changing a later token can never change an earlier output (with plain chunk boundaries it can:
a later token moves the boundaries of the sorted order). Padding tokens hash to an extra bucket of their own, so
they never share a chunk slot with real tokens and the amount of padding cannot change any real output.

Within each round this is local attention over the sorted sequence, so where `flex.use_fast_path` says so (CUDA by
default) it runs through FlexAttention: the rounds become extra heads, the static chunk band is a cached block mask,
and what depends on the hashes (same bucket, original positions) is applied by a score_mod. There, too, the hash
is one Triton kernel (`hash_kernel`), and the rows move to the sorted order and back by gathers whose backward is
the inverse gather (`permute`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..cache import LayerStateCache
from ..recompute import remembered
from .dense import dense_attend
from .flex import cached_block_mask, flex_attention, flex_can_run, use_fast_path
from .hash_kernel import bucket_sizes, fused_buckets, kernel_available, round_to_tf32
from .local import chunk_band, chunk_reach
from .masking import MASK_VALUE, SELF_MASK_VALUE, merge_heads, split_heads
from .permute import sort_rounds, unsort_rounds
from .projections import project


def rotation_width(num_buckets: int | list[int]) -> int:
    """Columns of the random rotation one hashing round needs."""
    return sum(size // 2 for size in bucket_sizes(num_buckets))


def total_buckets(num_buckets: int | list[int]) -> int:
    return math.prod(bucket_sizes(num_buckets))


# Rotated vectors held at once while hashing (fp32 elements: 512 MiB). With num_buckets growing with the length
# (the paper's rule), the rotated vectors (B, H, T, rounds, num_buckets / 2) grow as T^2: 32 GiB per round at 256K
# tokens with 8 heads and chunk 64, which is what bounded the Reformer's trainable length.
HASH_CHUNK_ELEMENTS = 1 << 27


def hash_vectors(vectors: torch.Tensor, rotations: torch.Tensor, num_buckets: int | list[int],
                 padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """vectors (B, H, T, D), rotations (R, D, rotation_width) -> buckets (B, H, R, T), int64.

    Hashing runs in fp32 even under autocast, on the vectors and rotations rounded to TF32 (products exact), so
    the cached and full forward passes agree; on CUDA (fast paths on, see `flex`) it runs as one fused Triton
    kernel that gives the same buckets (`hash_kernel`). Positions where
    ``padding_mask`` (B, T) is False go to the extra bucket ``total_buckets(num_buckets)``."""
    b, h, t, d = vectors.shape
    num_rounds, _, width = rotations.shape
    if total_buckets(num_buckets) == 1:
        buckets = vectors.new_zeros((b, h, num_rounds, t), dtype=torch.long)
    elif kernel_available(vectors) and use_fast_path(vectors, flex=False):
        with torch.no_grad():  # one Triton kernel, no rotated vectors stored (`hash_kernel`)
            buckets = fused_buckets(vectors.detach(), rotations, num_buckets)
    else:
        # Every round in one product, (D, R * width), over one slice of the sequence at a time, without autograd
        # (buckets have no gradient): the rotated vectors of the whole sequence would dominate peak memory at long
        # lengths; slices keep them under HASH_CHUNK_ELEMENTS. Each position's bucket depends on it alone.
        step = max(1, HASH_CHUNK_ELEMENTS // (b * h * num_rounds * width))
        with torch.no_grad(), torch.autocast(device_type=vectors.device.type, enabled=False):
            # the numbers the kernel multiplies, rounded to TF32 slice by slice (`hash_kernel`)
            vectors = vectors.float()
            all_rounds = round_to_tf32(rotations.float()).permute(1, 0, 2).reshape(d, num_rounds * width)
            parts = [
                _round_buckets((round_to_tf32(vectors[:, :, start:start + step]) @ all_rounds)
                               .unflatten(-1, (num_rounds, width)), num_buckets)
                for start in range(0, t, step)]  # (B, H, slice, R) each
            buckets = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).transpose(2, 3).contiguous()
    if padding_mask is not None:
        pad = ~padding_mask.bool()[:, None, None, :]
        buckets = buckets.masked_fill(pad, total_buckets(num_buckets))
    return buckets


def _round_buckets(rotated: torch.Tensor, num_buckets: int | list[int]) -> torch.Tensor:
    """(..., rotation_width) rotated vectors of one round -> (...) bucket ids.

    A bucket of size s is argmax over [x, -x] of the s/2 rotated coordinates x (Reformer, section 2), computed
    without forming [x, -x]: the first maximum is in x when max(x) >= max(-x), else at s/2 + argmin(x)."""
    sizes = bucket_sizes(num_buckets)
    buckets, stride, start = 0, 1, 0
    for size in sizes:  # factorised buckets: b1-bucket + b1 * b2-bucket
        part = rotated[..., start:start + size // 2]
        top, bottom = part.max(dim=-1), part.min(dim=-1)
        bucket = torch.where(top.values >= -bottom.values, top.indices, bottom.indices + size // 2)
        buckets = buckets + stride * bucket
        stride, start = stride * size, start + size // 2
    return buckets


def _look_one_back(x: torch.Tensor) -> torch.Tensor:
    """(B, H, R, n, C, ...) -> (B, H, R, n, 2C, ...): each chunk preceded by the chunk before it."""
    return torch.cat([x.roll(1, dims=3), x], dim=4)


def lsh_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, buckets: torch.Tensor | None,
               chunk_length: int, causal: bool, dropout: nn.Module | None = None,
               order: SortOrder | None = None) -> torch.Tensor:
    """Chunked LSH attention. query/key/value (B, H, T, D) with T a multiple of ``chunk_length``;
    buckets (B, H, R, T), or None where the caller passes their `sort_order` as ``order``. Returns (B, H, T, D)."""
    order = sort_order(buckets) if order is None else order
    if flex_can_run(query, dropout):
        return _lsh_attend_flex(query, key, value, order, chunk_length, causal)
    b, h, t, d = query.shape
    r, c = order.positions.shape[2], chunk_length
    n = t // c
    sorted_pos, slots = order.positions, order.slots()  # (B, H, R, T)

    def sort(x):  # (B, H, T, D) -> (B, H, R, n, C, D)
        return sort_rounds(x, sorted_pos, slots).view(b, h, r, n, c, x.shape[-1])

    q, k, v = sort(query), _look_one_back(sort(key)), _look_one_back(sort(value))
    q_bucket = order.buckets.view(b, h, r, n, c)
    q_pos = sorted_pos.view(b, h, r, n, c)
    k_bucket, k_pos = _look_one_back(q_bucket), _look_one_back(q_pos)  # (B, H, R, n, 2C)

    rank_q = torch.arange(t, device=query.device).view(n, c)  # slot in the sorted order
    rank_k = torch.cat([rank_q - c, rank_q], dim=-1)  # (n, 2C); negative = wrapped around from the last chunk
    in_window = (rank_k >= 0)[:, None, :]  # (n, 1, 2C)
    allowed = (q_bucket[..., :, None] == k_bucket[..., None, :]) & in_window
    if causal:
        allowed = allowed & (k_pos[..., None, :] <= q_pos[..., :, None])
        allowed = allowed & ((rank_q[:, :, None] - rank_k[:, None, :]) <= c)
    self_mask = (k_pos[..., None, :] == q_pos[..., :, None]) & in_window  # a single chunk wraps onto itself
    out, lse = dense_attend(q, k, v, allowed, 1.0 / math.sqrt(d), dropout, self_mask)  # (B,H,R,n,C,D), (B,H,R,n,C)
    return _unsort_and_combine(out.view(b, h, r, t, -1), lse.view(b, h, r, t), sorted_pos, slots)


class SortOrder(NamedTuple):
    """Each hashing round's sequence sorted by (bucket, position), both (B, H, R, T): ``positions`` (int64) the
    original position at each sorted slot, and ``buckets`` the bucket at each slot (int16 or int32; int64 where
    `sort_order` was given no bound). The inverse permutation, `slots`, is computed where it is used, so that an
    order kept for the reversible recomputation holds 10 bytes per entry (the buckets alone took 8)."""

    positions: torch.Tensor
    buckets: torch.Tensor

    def slots(self) -> torch.Tensor:
        """(B, H, R, T) int64: the slot of each original position (a scatter, cheaper than sorting again)."""
        order = torch.arange(self.positions.shape[-1], device=self.positions.device).expand_as(self.positions)
        return torch.empty_like(self.positions).scatter_(-1, self.positions, order)


def sort_order(buckets: torch.Tensor, num_ids: int | None = None) -> SortOrder:
    """The `SortOrder` of buckets (B, H, R, T) int64, whose ids are below ``num_ids`` (padding's bucket
    included; None: no bound known).

    A stable sort by bucket is the sort by (bucket, position). With a bound the ids are sorted as int16 (ids
    below 2^15) or int32: a radix sort's passes grow with the key's bytes, and on an H200 (torch 2.11, 8 heads
    x 4 rounds x 16K positions) the sort of int64 keys bucket * T + position took 176 us where int16 ids took
    79, their cast included."""
    if num_ids is not None:
        buckets = buckets.to(torch.int16 if num_ids <= 2 ** 15 else torch.int32)
    sorted_buckets, positions = torch.sort(buckets, dim=-1, stable=True)
    return SortOrder(positions, sorted_buckets)


def _unsort_and_combine(out: torch.Tensor, lse: torch.Tensor, sorted_pos: torch.Tensor,
                        slots: torch.Tensor) -> torch.Tensor:
    """out (B, H, R, T, D) and lse (B, H, R, T) in sorted order -> (B, H, T, D) in the original order."""
    return _combine_rounds(unsort_rounds(out, sorted_pos, slots), lse.gather(3, slots))


def _lsh_attend_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, order: SortOrder,
                     chunk_length: int, causal: bool) -> torch.Tensor:
    """`lsh_attend` through FlexAttention, with the same allowed pairs and scores.

    The R rounds of sorted queries/keys/values become R times the heads: (B, H * R, T, D). Over the sorted slots
    the allowed pairs are a static band, which goes into a cached block mask: a query's chunk and the chunk
    before; causal: the slots from ``chunk_length`` back up to the query's own (inside that band). The rest
    depends on the hashes and goes into the score_mod: keys of another bucket score MASK_VALUE, and a token's own
    key (the diagonal of the sorted slots) scores SELF_MASK_VALUE, as in `dense_attend`. Causal needs nothing
    more: within a bucket the sorted order is the original order, so an earlier slot of the same bucket is an
    earlier position. Each query's own key is in its band, so no row is empty and the log-sum-exps equal the
    readable path's; gradients reach the round weights through them."""
    b, h, t, d = query.shape
    r, c = order.positions.shape[2], chunk_length
    sorted_pos, slots = order.positions, order.slots()
    q, k, v = (sort_rounds(x, sorted_pos, slots).view(b, h * r, t, x.shape[-1])
               for x in (query, key, value))
    slot_bucket = order.buckets.view(b, h * r, t).to(torch.int32)  # int32 (where int64: half the reads)

    def score_mod(score, bi, hi, q_idx, kv_idx):
        score = torch.where(slot_bucket[bi, hi, q_idx] == slot_bucket[bi, hi, kv_idx], score, MASK_VALUE)
        return torch.where(q_idx == kv_idx, SELF_MASK_VALUE, score)

    band = chunk_band(c, 1, 0, causal)

    def window(bi, hi, q_idx, kv_idx):  # causal: at most c slots back (then also inside the chunk band)
        allowed = band(bi, hi, q_idx, kv_idx)
        return allowed & (q_idx - kv_idx <= c) if causal else allowed

    block_mask = cached_block_mask(("lsh", c, causal), window, None, None, t, t, query.device,
                                   reach=chunk_reach(c, 1, 0, causal))
    out, lse = flex_attention(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=1.0 / math.sqrt(d),
                              return_lse=True)
    return _unsort_and_combine(out.view(b, h, r, t, -1), lse.view(b, h, r, t), sorted_pos, slots)


class _CombineRounds(torch.autograd.Function):
    """out (B, H, R, T, D), lse (B, H, R, T) -> sum_r w_r out_r with w = softmax over the rounds of lse, in out's
    dtype: the products are rounded to it and summed in fp32 (for bf16 out).

    Backward, with g the result's gradient and s_r = sum_D g out_r: d out_r = w_r g and d lse_r = w_r (s_r -
    sum_q w_q s_q) (the softmax's). That difference is unchanged when every s_r is taken s_0 from, so it is
    computed from s_r - s_0 = sum_D g (out_r - out_0): rounds often have close outputs, whose difference is exact
    in bf16, where the products g out_r rounded to bf16 would cancel. Only out and w are kept. Autograd on the
    fp32 formula kept an fp32 copy of the R rounds' outputs and made three more passes over (R, T, D) per head in
    fp32, in each forward pass, its recomputation in the reversible backward, and the backward pass. Not
    differentiable twice (w is computed without a graph)."""

    @staticmethod
    def forward(out, lse):
        weights = torch.softmax(lse.to(torch.promote_types(lse.dtype, torch.float32)), dim=2)
        return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=2), weights

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward: what torch.func's transforms need
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])
        ctx.lse_dtype = inputs[1].dtype

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        out, weights = ctx.saved_tensors
        grad = grad.unsqueeze(2).to(out.dtype)  # (B, H, 1, T, D)
        grad_out = grad * weights.unsqueeze(-1).to(out.dtype)
        sums = ((out - out[:, :, :1]) * grad).sum(dim=-1, dtype=weights.dtype)  # s_r - s_0: (B, H, R, T)
        grad_lse = weights * (sums - (weights * sums).sum(dim=2, keepdim=True))
        return grad_out, grad_lse.to(ctx.lse_dtype)


def _combine_rounds(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """out (B, H, R, T, D), lse (B, H, R, T) -> (B, H, T, D), each round weighted by its share of the mass."""
    if out.shape[2] == 1:  # the weight is exactly 1 (and its gradient 0)
        return out[:, :, 0]
    return _CombineRounds.apply(out, lse)[0]


def lsh_attend_cached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, buckets: torch.Tensor,
                      chunk_length: int, dropout: nn.Module | None = None) -> torch.Tensor:
    """Causal LSH attention of the last Q positions over all T (incremental decoding).

    query (B, H, Q, D), key/value (B, H, T, D), buckets (B, H, R, T). Attends to the same keys as `lsh_attend`
    does for these positions: own bucket, not later, at most ``chunk_length`` bucket-mates back."""
    t, q_len = key.shape[2], query.shape[2]
    positions = torch.arange(t, device=query.device)
    slots = sort_order(buckets).slots()  # (B, H, R, T): slot of each position in the sorted order
    q_slots, q_bucket = slots[..., t - q_len:], buckets[..., t - q_len:]
    q_pos = positions[t - q_len:]
    allowed = ((q_bucket[..., :, None] == buckets[..., None, :])
               & (positions[None, :] <= q_pos[:, None])
               & ((q_slots[..., :, None] - slots[..., None, :]) <= chunk_length))
    self_mask = positions[None, :] == q_pos[:, None]
    out, lse = dense_attend(query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2), allowed,
                            1.0 / math.sqrt(query.shape[-1]), dropout, self_mask)
    return _combine_rounds(out, lse)


class LSHSelfAttention(nn.Module):
    """Multi-head LSH self-attention with a shared query/key projection.

    Args:
        hidden_size: width of the input and output.
        num_heads, head_size: heads and their width.
        chunk_length: chunk length of the sorted sequence; inputs must be a multiple of it.
        num_buckets: buckets per round (even, 1, or a factorised pair [b1, b2]).
        num_hashes: hashing rounds.
        causal: autoregressive masking.
        dropout: dropout on attention probabilities.
        hash_seed: with a seed, rotations are fixed (`fixed_rotations`) in training too; without one, training
            draws fresh rotations each call and evaluation uses the fixed ones (seeded by 0).
        layer_idx: the layer this module sits in (its slot in a `LayerStateCache`, and its rotation seed).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_size: int, chunk_length: int,
                 num_buckets: int | list[int], num_hashes: int = 1, causal: bool = True, dropout: float = 0.0,
                 hash_seed: int | None = None, layer_idx: int = 0):
        super().__init__()
        self.num_heads, self.head_size = num_heads, head_size
        self.chunk_length, self.num_buckets, self.num_hashes = chunk_length, num_buckets, num_hashes
        self.causal, self.layer_idx = causal, layer_idx
        self.fresh_rotations = hash_seed is None
        self.rotation_seed = (0 if hash_seed is None else hash_seed) * 1_000_003 + layer_idx
        self.query_key = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * head_size, bias=False)
        self.output = nn.Linear(num_heads * head_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("fixed_rotations", self.seeded_rotations(), persistent=False)

    def seeded_rotations(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.rotation_seed)
        shape = (self.num_hashes, self.head_size, rotation_width(self.num_buckets))
        return torch.randn(shape, generator=generator, device="cpu")  # also under a CUDA default device

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None,
                cache: LayerStateCache | None = None) -> torch.Tensor:
        """hidden_states (B, T, hidden); padding_mask (B, T_all) bool, True for real tokens, covering the cached
        positions too when decoding. Returns (B, T, hidden)."""
        query, value = (split_heads(x, self.num_heads)  # (B, H, T, D)
                        for x in project(hidden_states, [self.query_key, self.value]))
        key = nn.functional.normalize(query, dim=-1, eps=1e-6)
        if self.training and self.fresh_rotations:  # drawn in a recomputation too: later random numbers line up
            rotations = torch.randn(self.fixed_rotations.shape, device=query.device)
        else:
            rotations = self.fixed_rotations
        new_mask = None if padding_mask is None else padding_mask[:, padding_mask.shape[1] - query.shape[2]:]

        def hashed():  # the buckets for a cache, else (the whole sequence is attended here) their sorted order
            buckets = hash_vectors(query, rotations, self.num_buckets, new_mask)
            if cache is not None:
                return buckets, None
            return None, sort_order(buckets, total_buckets(self.num_buckets) + 1)  # padding's bucket too

        # the reversible stack's recomputation gets them back (`recompute`): its hashing and sorting are skipped
        buckets, order = remembered(hashed)

        if cache is not None and cache.has(self.layer_idx):
            key = cache.append(self.layer_idx, "key", key, seq_dim=2)
            value = cache.append(self.layer_idx, "value", value, seq_dim=2)
            buckets = cache.append(self.layer_idx, "buckets", buckets, seq_dim=3)
            out = lsh_attend_cached(query, key, value, buckets, self.chunk_length, self.dropout)
        else:
            if cache is not None:
                for name, tensor, dim in (("key", key, 2), ("value", value, 2), ("buckets", buckets, 3)):
                    cache.append(self.layer_idx, name, tensor, seq_dim=dim)
            out = lsh_attend(query, key, value, buckets, self.chunk_length, self.causal, self.dropout, order)
        return self.output(merge_heads(out))
