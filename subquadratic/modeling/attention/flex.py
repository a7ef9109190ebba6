"""FlexAttention plumbing shared by the fast paths of the attention modules.

Each mechanism keeps its readable PyTorch path; where its allowed (query, key) pairs are a block-sparse pattern,
it can also run through `torch.nn.attention.flex_attention` with a block mask, which never materialises the scores.
Which path runs is decided here, once for all modules:

- `fast_paths(None)` (the default): the fast path runs on CUDA tensors, the readable path everywhere else (a
  mechanism can keep its fast path opt-in while it is not known to pay: `use_fast_path(..., auto=False)`).
- `fast_paths(True)`: the fast path wherever it can run. On CPU, FlexAttention is the unfused reference
  implementation and has no backward pass, so this is for checking outputs against the readable path.
- `fast_paths(False)`: always the readable path (for comparisons and debugging).

The setting is process-wide (`set_fast_paths`) or scoped (`with fast_paths(False): ...`). A module that runs
attention dropout while training uses its readable path (FlexAttention has no dropout).

Block masks depend only on the shape of the problem, so modules build them through `cached_block_mask`, keyed by
everything they depend on, once per shape rather than per step; they are built eagerly (`build_block_mask`), since
compiling `create_block_mask` for each new length took minutes on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

import torch

try:  # FlexAttention exists from torch 2.5; the package still runs (readable paths only) without it.
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # pragma: no cover - depends on the installed torch
    _flex_module = None

_STATE = threading.local()
_DEFAULT: list[bool | None] = [None]
_BLOCK_MASKS: OrderedDict = OrderedDict()
_MAX_CACHED_MASKS = 64


def flex_available() -> bool:
    return _flex_module is not None


def _check_setting(enabled) -> None:
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"enabled={enabled!r}: expected None, True or False")


def set_fast_paths(enabled: bool | None) -> None:
    """Process-wide choice: None (fast paths on CUDA only), True (wherever possible) or False (never)."""
    _check_setting(enabled)
    _DEFAULT[0] = enabled


@contextlib.contextmanager
def fast_paths(enabled: bool | None) -> Iterator[None]:
    """Scoped version of `set_fast_paths` (this thread only)."""
    _check_setting(enabled)
    previous = getattr(_STATE, "enabled", "unset")
    _STATE.enabled = enabled
    try:
        yield
    finally:
        if previous == "unset":
            del _STATE.enabled
        else:
            _STATE.enabled = previous


def use_fast_path(tensor: torch.Tensor, auto: bool = True, flex: bool = True) -> bool:
    """Whether a mechanism given ``tensor`` should take its fast path.

    ``auto``: whether the mechanism's fast path is on by default (`fast_paths(None)`) on CUDA; a mechanism whose
    fast path is not yet known to pay (see BENCHMARKS.md) passes False and runs it only under `fast_paths(True)`.
    ``flex``: whether the fast path is FlexAttention (which needs torch >= 2.5 and has no backward on CPU) rather
    than, say, `scaled_dot_product_attention`."""
    if flex and not flex_available():
        return False
    enabled = getattr(_STATE, "enabled", "unset")
    if enabled == "unset":
        enabled = _DEFAULT[0]
    if enabled is None:
        return auto and tensor.is_cuda
    if flex and enabled and tensor.requires_grad and not tensor.is_cuda:
        return False  # no backward pass on CPU: the readable path keeps training correct there
    return enabled


FLEX_MIN_HEAD_DIM = 16  # the compiled kernels (inductor's lowering) refuse smaller query/key/value head sizes


def flex_can_run(query: torch.Tensor, dropout: torch.nn.Module | None, auto: bool = True) -> bool:
    """`use_fast_path` for a FlexAttention path, no attention dropout active (FlexAttention has none), and on CUDA
    a head size the compiled kernels take (at least `FLEX_MIN_HEAD_DIM`; smaller heads run the readable path)."""
    dropout_active = dropout is not None and dropout.training and dropout.p > 0
    if query.is_cuda and query.shape[-1] < FLEX_MIN_HEAD_DIM:
        return False
    return not dropout_active and use_fast_path(query, auto)


@functools.cache
def _compiled_flex() -> Callable:
    # One compiled function for every caller; dynamic=False gives each shape its own kernels, cached by inductor
    # across processes. Each (length, heads, mask kind) is a recompilation of this one function, so dynamo's
    # default limit of 8 would soon be hit, after which it silently runs the unfused eager reference.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    return torch.compile(_flex_module.flex_attention, dynamic=False)


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, block_mask=None,
                   score_mod: Callable | None = None, scale: float | None = None, return_lse: bool = False):
    """`flex_attention` (compiled on CUDA, the eager reference elsewhere) on (B, H, T, D) tensors of one dtype.

    Returns the output (B, H, Tq, D), and with ``return_lse`` also the fp32 log-sum-exp of the scores (B, H, Tq),
    through which gradients flow."""
    dtype = value.dtype
    # Contiguous inputs of one dtype, and autocast off inside: the compiled kernels' backward can fail to compile
    # under autocast, and the dtype is already decided by the caller's projections.
    query, key, value = (x.to(dtype).contiguous() for x in (query, key, value))
    fn = _compiled_flex() if query.is_cuda and not torch.compiler.is_compiling() else _flex_module.flex_attention
    kwargs = {"block_mask": block_mask, "score_mod": score_mod, "scale": scale}
    with torch.autocast(query.device.type, enabled=False):
        if not return_lse:
            return fn(query, key, value, **kwargs)
        if hasattr(_flex_module, "AuxRequest"):
            out, aux = fn(query, key, value, return_aux=_flex_module.AuxRequest(lse=True), **kwargs)
            return out, aux.lse
        return fn(query, key, value, return_lse=True, **kwargs)


def cached_block_mask(key: Hashable, mask_mod: Callable, batch: int | None, heads: int | None, q_len: int,
                      kv_len: int, device: torch.device, block_size: int = 128,
                      reach: tuple[int, int] | None = None):
    """A `BlockMask` for ``mask_mod`` over (batch, heads, q_len, kv_len), built once per ``key`` and device
    (`build_block_mask`).

    ``key`` must name everything ``mask_mod`` depends on (the mechanism, its settings and the lengths); masks whose
    mask_mod reads tensors that change between calls must not be cached. A mask first needed under inference mode
    is built outside it: inference tensors cannot be saved for the backward pass of a later training step."""
    full_key = (key, batch, heads, q_len, kv_len, str(device), block_size, reach)
    mask = _BLOCK_MASKS.get(full_key)
    if mask is None:
        outside = torch.inference_mode(False) if not torch.compiler.is_compiling() else contextlib.nullcontext()
        with outside:
            mask = build_block_mask(mask_mod, batch, heads, q_len, kv_len, device, block_size, reach)
        _BLOCK_MASKS[full_key] = mask
        if len(_BLOCK_MASKS) > _MAX_CACHED_MASKS:
            _BLOCK_MASKS.popitem(last=False)
    else:
        _BLOCK_MASKS.move_to_end(full_key)
    return mask


def cached_block_masks() -> list:
    """The block masks in the cache now (a CUDA graph that read them keeps them alive with this)."""
    return list(_BLOCK_MASKS.values())


_MASK_CHUNK_ELEMENTS = 1 << 24  # mask entries evaluated at once by build_block_mask (bounds its memory)


def build_block_mask(mask_mod: Callable, batch: int | None, heads: int | None, q_len: int, kv_len: int,
                     device: torch.device, block_size: int = 128, reach: tuple[int, int] | None = None):
    """What `create_block_mask(mask_mod, ...)` returns (same partial and full blocks), built without compiling.

    `create_block_mask` either materialises the whole q_len x kv_len mask (eager) or compiles a kernel for each new
    shape: on an H100 with torch 2.11, compiling the one for a 16K-token sliding window took over two and a half
    minutes (BENCHMARKS.md). Here ``mask_mod`` is evaluated eagerly (`create_mask`) over bands of query blocks,
    ``_MASK_CHUNK_ELEMENTS`` entries at a time. ``reach = (before, after)`` promises that every allowed pair has
    ``q_idx - before <= kv_idx <= q_idx + after``: then only the key blocks within that reach of each band are
    evaluated, so a banded mask costs time linear in the length instead of quadratic.

    Inside a model compiled as a whole (`torch.compile(model)`), torch's own builder is traced into the graph
    instead (the eager loop here would break it)."""
    if torch.compiler.is_compiling():
        return _flex_module.create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device,
                                              BLOCK_SIZE=block_size)
    b, h = batch or 1, heads or 1
    n_q, n_kv = -(-q_len // block_size), -(-kv_len // block_size)
    partial = torch.zeros(b, h, n_q, n_kv, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    before, after = reach if reach is not None else (kv_len, kv_len)
    span = min(n_kv, -(-(before + after) // block_size) + 2)  # key blocks one query block can touch
    rows = n_q  # query blocks per chunk: halved until a chunk's mask entries fit the budget
    while rows > 1 and b * h * rows * min(n_kv, rows + span) * block_size * block_size > _MASK_CHUNK_ELEMENTS:
        rows = (rows + 1) // 2
    for q_block in range(0, n_q, rows):
        q_end = min(n_q, q_block + rows)
        q0, q1 = q_block * block_size, min(q_len, q_end * block_size)
        k_block = max(0, q0 - before) // block_size
        k_end = min(n_kv, -(-(q1 + after) // block_size))
        k0, k1 = k_block * block_size, min(kv_len, k_end * block_size)

        def shifted(bi, hi, q_idx, kv_idx, q0=q0, k0=k0):
            return mask_mod(bi, hi, q_idx + q0, kv_idx + k0)

        mask = _flex_module.create_mask(shifted, b, h, q1 - q0, k1 - k0, device)
        # pad to whole blocks with False (as create_block_mask does): a block cut by the end is never full
        mask = torch.nn.functional.pad(mask, (0, (k_end - k_block) * block_size - (k1 - k0),
                                              0, (q_end - q_block) * block_size - (q1 - q0)))
        count = mask.view(b, h, q_end - q_block, block_size, k_end - k_block, block_size).sum(dim=(3, 5))
        full[:, :, q_block:q_end, k_block:k_end] = count == block_size * block_size
        partial[:, :, q_block:q_end, k_block:k_end] = (count > 0) & (count < block_size * block_size)

    def ordered(blocks):  # (B, H, n_q, n_kv) bool -> counts, then the marked block indices first (in order)
        counts = blocks.sum(dim=-1, dtype=torch.int32)
        return counts, torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)

    return _flex_module.BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size,
                                                 mask_mod=mask_mod, seq_lengths=(q_len, kv_len))
