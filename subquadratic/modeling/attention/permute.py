"""Rows of (B, H, T, D) tensors moved into each LSH hashing round's sorted order and back (`lsh_attend`).

Each round sorts the sequence: slot s of round r holds original position sorted_pos[..., r, s], and position p
sits in slot slots[..., r, p] (a permutation of 0..T-1 per batch entry, head and round, and its inverse).
Autograd's backward of a gather is a scatter_add with atomics; since the rows are permuted, the backward of
each direction here is the other one, a gather by the inverse permutation (then a sum over the rounds for the
sorted copies), with no atomics.

The gathers read an index per element. They move the rows as 8- or 4-byte words where the rows' memory
allows (`_as_words`): a bf16 row of 64 is 16 words, four times fewer indices to read. Measured on an H200
(torch 2.11, bf16, B * H = 4, T = 65536, D = 64, R = 2, eager): 44 us for the gather that takes 110 us on bf16
elements (a copy of the same bytes: 37 us); backward 100 to 135 us for the sorted copies (scatter_add: 157)
and 50 us for the unsorting (scatter_add: 172). Row copies with `index_select` on a (rows, D) view took 320 us
there: on CUDA it runs one thread block per index, and a 128-byte row keeps only 8 of its threads busy."""

from __future__ import annotations

import torch


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) -> the same memory as (..., D / k) words of k elements (8 or 4 bytes), where each row of x
    is contiguous and its strides and offset split into whole words; otherwise x itself. No copy.

    Only in eager mode without a graph being recorded: a dtype view has no gradient (a double backward runs
    the plain gather), and under torch.compile the compiler writes its own gather."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return x
    for word in (torch.int64, torch.int32):
        k = word.itemsize // x.element_size()
        if (k > 1 and x.stride(-1) == 1 and x.shape[-1] % k == 0 and x.storage_offset() % k == 0
                and all(stride % k == 0 for stride in x.stride()[:-1])):
            return x.view(word)
    return x


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (..., N, D), index (..., S) int64 with the same leading dims -> (..., S, D):
    out[..., s, :] = x[..., index[..., s], :]. Any strides; the result is contiguous and in x's dtype."""
    words = _as_words(x)
    out = words.gather(-2, index.unsqueeze(-1).expand(*index.shape, words.shape[-1]))
    return out if words is x else out.view(x.dtype)


class _SortRounds(torch.autograd.Function):
    """x (B, H, T, D) -> (B, H, R * T, D) in each round's sorted order; backward: the gradient of each round
    taken back to the original order by ``slots`` and summed over the rounds (by `sum`, which accumulates
    half-precision gradients in fp32, or for two rounds by one add, which rounds once as well)."""

    @staticmethod
    def forward(x, sorted_pos, slots):
        b, h, r, t = sorted_pos.shape
        return _gather_rows(x, sorted_pos.reshape(b, h, r * t))

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward: what torch.func's transforms need
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        b, h, r, t = slots.shape
        grad = _gather_rows(grad.unflatten(2, (r, t)), slots)  # (B, H, R, T, D) in the original order
        if r == 1:
            return grad[:, :, 0], None, None
        if r == 2:  # 51 us where `sum` took 73 (the H200 above)
            return grad[:, :, 0] + grad[:, :, 1], None, None
        return grad.sum(dim=2), None, None


class _UnsortRounds(torch.autograd.Function):
    """y (B, H, R, T, D) in each round's sorted order -> the same in the original order; backward: the
    gradient taken to the sorted order by ``sorted_pos``."""

    @staticmethod
    def forward(y, sorted_pos, slots):
        return _gather_rows(y, slots)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (sorted_pos,) = ctx.saved_tensors
        return _gather_rows(grad, sorted_pos), None, None


def sort_rounds(x: torch.Tensor, sorted_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) -> (B, H, R * T, D): the sequence in each round's sorted order, rounds one after
    another.

    sorted_pos (B, H, R, T) int64: the original position at each sorted slot (a permutation per round); slots
    (B, H, R, T): its inverse, the slot of each original position. Equals
    ``x.gather(2, sorted_pos.reshape(B, H, R * T, 1).expand(-1, -1, -1, D))``, and so does the gradient."""
    return _SortRounds.apply(x, sorted_pos, slots)


def unsort_rounds(y: torch.Tensor, sorted_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """y (B, H, R, T, D) in each round's sorted order -> (B, H, R, T, D) in the original order: position p of
    round r is y[..., r, slots[..., r, p], :]. sorted_pos and slots as in `sort_rounds`. Equals
    ``y.gather(3, slots[..., None].expand(-1, -1, -1, -1, D))``, and so does the gradient."""
    return _UnsortRounds.apply(y, sorted_pos, slots)
