"""FlexAttention plumbing shared by the fast paths of the attention modules.

Each mechanism keeps its readable PyTorch path; where its allowed (query, key) pairs are a block-sparse pattern,
it can also run through `torch.nn.attention.flex_attention` with a block mask, which never materialises the scores.
Which path runs is decided here, once for all modules:

- `fast_paths(None)` (the default): the fast path runs on CUDA tensors, the readable path everywhere else; except
  the sliding-window path, whose first compiled step took minutes on an H100 (BENCHMARKS.md): it runs only when
  asked for with `fast_paths(True)`.
- `fast_paths(True)`: the fast path wherever it can run. On CPU, FlexAttention is the unfused reference
  implementation and has no backward pass, so this is for checking outputs against the readable path.
- `fast_paths(False)`: always the readable path (for comparisons and debugging).

The setting is process-wide (`set_fast_paths`) or scoped (`with fast_paths(False): ...`). A module that runs
attention dropout while training uses its readable path (FlexAttention has no dropout).

Block masks depend only on the shape of the problem, so modules build them through `cached_block_mask`, keyed by
everything they depend on; building one for 64K tokens takes long enough that it must happen once, not per step.
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


def flex_can_run(query: torch.Tensor, dropout: torch.nn.Module | None, auto: bool = True) -> bool:
    """`use_fast_path` for a FlexAttention path, and no attention dropout active (FlexAttention has none)."""
    dropout_active = dropout is not None and dropout.training and dropout.p > 0
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
                      kv_len: int, device: torch.device, block_size: int = 128):
    """A `BlockMask` for ``mask_mod`` over (batch, heads, q_len, kv_len), built once per ``key`` and device.

    ``key`` must name everything ``mask_mod`` depends on (the mechanism, its settings and the lengths); masks whose
    mask_mod reads tensors that change between calls must not be cached."""
    full_key = (key, batch, heads, q_len, kv_len, str(device), block_size)
    mask = _BLOCK_MASKS.get(full_key)
    if mask is None:
        # compiled on CUDA: the eager version materialises the whole q_len x kv_len mask (4G entries at 64K)
        mask = _flex_module.create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device,
                                              BLOCK_SIZE=block_size, _compile=torch.device(device).type == "cuda")
        _BLOCK_MASKS[full_key] = mask
        if len(_BLOCK_MASKS) > _MAX_CACHED_MASKS:
            _BLOCK_MASKS.popitem(last=False)
    else:
        _BLOCK_MASKS.move_to_end(full_key)
    return mask
