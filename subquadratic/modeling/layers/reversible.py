"""Reversible residual layers (Gomez et al. 2017; Reformer, section 3).

Each block maps two streams (x1, x2) to

    y1 = x1 + F(x2)        F: attention sub-layer
    y2 = x2 + G(y1)        G: feed-forward sub-layer

and can be inverted: x2 = y2 - G(y1), x1 = y1 - F(x2). `ReversibleStack` runs the blocks inside one custom
autograd function that keeps only the last block's outputs; the backward pass rebuilds each block's inputs from
its outputs while it recomputes the block, so activation memory does not grow with depth. For the recomputation
to equal the forward pass, each sub-layer replays the random state (dropout, fresh LSH rotations) and the autocast
precision it ran under, and gets back the discrete choices it made (LSH buckets, `recompute.remembered`) instead
of making them again from inputs that were rebuilt only up to rounding. Parameters enter the autograd function as inputs, so their gradients come back through
autograd itself (`torch.autograd.grad`, DDP hooks and gradient accumulation work as with any layer).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..graph_capture import capturing
from ..recompute import recording, replaying


class _RandomState:
    """The CPU and (when used) CUDA generator states at one point of the forward pass.

    While a CUDA graph records, the CUDA generator's state cannot be read or set from the host; a block whose
    recomputation needs no random numbers (no active dropout: fresh LSH rotations are drawn again, but the buckets
    come from the record) then replays only the CPU state, and one that does is refused."""

    def __init__(self, device: torch.device, module: nn.Module):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda" and capturing():
            if _active_dropout(module):
                raise RuntimeError("A reversible layer with active dropout cannot be recorded in a CUDA graph: its "
                                   "backward pass must replay the forward pass's random numbers. Set the dropout "
                                   "probabilities to 0 or train without a CUDA graph.")
        elif device.type == "cuda":
            self.cuda = torch.cuda.get_rng_state(device)

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _active_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in module.modules())


def _autocast_state(device_type: str):
    """What `torch.autocast` replays: device type, dtype (None when off), enabled, cache_enabled (a CUDA graph
    records with the cache off)."""
    enabled = torch.is_autocast_enabled(device_type)
    return (device_type, (torch.get_autocast_dtype(device_type) if enabled else None), enabled,
            torch.is_autocast_cache_enabled())


def _params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, stack: ReversibleStack, f_kwargs: dict, *params):
        ctx.stack, ctx.num_params = stack, len(params)
        # The backward pass recomputes F; it must not append to a decoding cache a second time.
        ctx.f_kwargs = {k: v for k, v in f_kwargs.items() if k != "cache"}
        ctx.autocast = _autocast_state(x1.device.type)
        ctx.random_states, ctx.decisions = [], []
        for f, g in zip(stack.f_blocks, stack.g_blocks):
            f_state, f_decisions = _RandomState(x1.device, f), []
            with recording(f_decisions):  # e.g. LSH buckets: the recomputation must not hash rebuilt inputs again
                x1 = x1 + f(x2, **f_kwargs)
            g_state = _RandomState(x1.device, g)
            x2 = x2 + g(x1)
            ctx.random_states.append((f_state, g_state))
            ctx.decisions.append(f_decisions)
            stack.record(x1, x2)
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, grad_y1, grad_y2):
        y1, y2 = ctx.saved_tensors
        device_type, dtype, enabled, cache = ctx.autocast
        autocast = functools.partial(torch.autocast, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache)
        grads: dict[nn.Parameter, torch.Tensor] = {}
        blocks = list(zip(ctx.stack.f_blocks, ctx.stack.g_blocks, ctx.random_states, ctx.decisions))
        for f, g, (f_state, g_state), f_decisions in reversed(blocks):
            # G: rebuild x2 = y2 - G(y1) and push grad_y2 through G.
            with torch.enable_grad(), autocast(), g_state.replay():
                y1 = y1.detach().requires_grad_(True)
                g_out = g(y1)
            g_params = _params(g)
            g_grads = torch.autograd.grad(g_out, (y1, *g_params), grad_y2, allow_unused=True)
            x2 = (y2 - g_out).detach()
            grad_y1 = grad_y1 + g_grads[0]
            # F: rebuild x1 = y1 - F(x2) and push grad_y1 through F.
            with torch.enable_grad(), autocast(), f_state.replay(), replaying(f_decisions):
                x2 = x2.requires_grad_(True)
                f_out = f(x2, **ctx.f_kwargs)
            f_params = _params(f)
            f_grads = torch.autograd.grad(f_out, (x2, *f_params), grad_y1, allow_unused=True)
            x1 = (y1 - f_out).detach()
            grad_y2 = grad_y2 + f_grads[0]
            for p, gr in zip([*g_params, *f_params], [*g_grads[1:], *f_grads[1:]]):
                if gr is not None:
                    grads[p] = gr if p not in grads else grads[p] + gr
            y1, y2 = x1, x2
        params = ctx.stack.trainable_params()  # the same parameters as in forward, in the same order
        if len(params) != ctx.num_params:
            raise RuntimeError(f"the reversible layers had {ctx.num_params} trainable parameters in the forward pass "
                               f"and {len(params)} in the backward pass: parameters must not change in between")
        param_grads = [grads.get(p) for p in params]
        return (grad_y1, grad_y2, None, None, *param_grads)


class ReversibleStack(nn.Module):
    """Blocks (F_i, G_i) applied to two streams. ``f_blocks[i](x, **f_kwargs)`` and ``g_blocks[i](x)`` map
    (B, T, hidden) to (B, T, hidden). An ``f_kwargs["cache"]`` is passed on the forward pass only, never to the
    recomputation in the backward pass.

    ``reversible=False`` runs the same arithmetic with ordinary autograd (every activation stored); the outputs
    and gradients are the same, which is what the tests check."""

    def __init__(self, f_blocks: list[nn.Module], g_blocks: list[nn.Module], reversible: bool = True):
        super().__init__()
        self.f_blocks = nn.ModuleList(f_blocks)
        self.g_blocks = nn.ModuleList(g_blocks)
        self.reversible = reversible
        self.gradient_checkpointing = False
        self._recorded: list | None = None

    def trainable_params(self) -> list[nn.Parameter]:
        return _params(self)

    def record(self, x1: torch.Tensor, x2: torch.Tensor) -> None:
        if self._recorded is not None:
            self._recorded.append(((x1 + x2) / 2).detach())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, f_kwargs: dict | None = None,
                output_hidden_states: bool = False):
        """Returns (y1, y2, hidden_states). ``hidden_states`` is None, or the mean of the two streams after each
        block (detached when the stack runs reversibly: they are not part of its autograd graph)."""
        f_kwargs = f_kwargs or {}
        self._recorded = [] if output_hidden_states else None
        try:
            needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or any(
                p.requires_grad for p in self.parameters()))
            if self.reversible and needs_grad:
                params = self.trainable_params()
                if next(self.parameters(), None) is None and any(isinstance(m, nn.Linear) for m in self.modules()):
                    # FSDP1 without use_orig_params moves the parameters off the modules: the recomputation in
                    # the backward pass could not hand their gradients back, and they would silently not train.
                    raise RuntimeError("the reversible layers' parameters are not registered on their modules "
                                       "(FSDP1 with use_orig_params=False?): use FSDP2 (fully_shard, accelerate's "
                                       "fsdp_version=2), FSDP1 with use_orig_params=True, or reversible=False")
                y1, y2 = _ReversibleFunction.apply(x1, x2, self, f_kwargs, *params)
            else:
                y1, y2 = x1, x2
                for f, g in zip(self.f_blocks, self.g_blocks):
                    if self.gradient_checkpointing and needs_grad:
                        y1, y2 = self._gradient_checkpointing_func(self._block, f, g, y1, y2, f_kwargs)
                    else:
                        y1, y2 = self._block(f, g, y1, y2, f_kwargs)
                    if self._recorded is not None:
                        self._recorded.append((y1 + y2) / 2)
            return y1, y2, self._recorded
        finally:
            self._recorded = None

    @staticmethod
    def _block(f: nn.Module, g: nn.Module, x1: torch.Tensor, x2: torch.Tensor, f_kwargs: dict):
        y1 = x1 + f(x2, **f_kwargs)
        return y1, x2 + g(y1)
