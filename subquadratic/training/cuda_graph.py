"""A training step (forward pass, loss, backward pass) recorded once as a CUDA graph and replayed.

At 16K tokens and below an eager training step of these models is bound by the host: the GPU waits for Python and
the autograd engine to launch some 600-1,000 kernels (BENCHMARKS.md). A CUDA graph launches all of them at once.
The models here can be recorded because their forward and backward passes never read a value back from the GPU
(no `.item()`, no data-dependent shapes; with global tokens, when the config bounds their count with
`max_global_tokens`); `transformers`' Reformer and Longformer cannot (theirs copy from host memory or seed the
generator).

    step = CapturedTrainingStep(model, {"input_ids": ids, "labels": labels}, autocast_dtype=torch.bfloat16)
    for batch in batches:                     # every batch of the same shapes and dtypes as the example
        loss = step(batch)                    # adds the batch's gradients to each parameter's .grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the .grad tensors the graph writes into

What a graph fixes at recording time, and what therefore must not change between steps: the batch's keys, shapes
and dtypes (a new length needs a new `CapturedTrainingStep`), the parameters' and gradients' storage (update them
in place, as optimizers do; do not set gradients to None or move the model; both are checked at each call), and
the mode (train/eval) and settings of the model. No autograd graph of an eager step may be alive while the step
records (a loss kept without `.detach()`): its parameters' gradient-accumulation nodes would be reused, with the
default stream they ran on, which a recording cannot depend on. A padding mask stays in the graph even when a
batch has no padding. Attention dropout is recorded too (the generator advances at each replay; the warm-up steps
before the recording give back the random numbers they drew), except in reversible layers, whose backward pass
must replay the forward pass's random numbers from the host: a Reformer with active dropout is refused. A batch
with more global tokens in a row than the model's `max_global_tokens` is refused before the replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..modeling.attention.flex import cached_block_masks
from ..modeling.graph_capture import preparing_graph

_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every recording's warm-up: cuBLAS keeps a workspace for each stream it has
    run on until the process ends, so a new stream per recording would keep tens of MiB each."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def model_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss a model of this package (or of `transformers`) returns for a batch with labels."""
    return model(**batch).loss


class CapturedTrainingStep:
    """Forward pass, loss and backward pass of ``model`` on batches shaped like ``example_batch``, recorded as one
    CUDA graph; calling it replays the graph.

    Args:
        model: on a CUDA device, in the mode it trains in (`model.train()`).
        example_batch: name -> tensor on the model's device; every later batch must have the same names, shapes
            and dtypes. Its values are copied; the step does not keep the caller's tensors.
        compute_loss: ``compute_loss(model, batch) -> scalar loss``; default `model_loss` (``model(**batch).loss``).
        autocast_dtype: run the forward pass under `torch.autocast` with this dtype (e.g. torch.bfloat16); None:
            no autocast. The backward pass records in the same precision.
        warmup_steps: eager steps on a side stream before recording (CUDA graphs need the lazy initialisation of
            cuBLAS, compiled kernels and cached masks done before); their gradients are discarded.

    Calling it with a batch copies the batch into the recorded inputs and replays; without one it replays on the
    last batch. Returns the loss as a tensor that the next call overwrites (take `.item()` or a clone to keep it).
    Gradients are added to `.grad` like `loss.backward()`, so several calls accumulate; zero them with
    ``zero_grad(set_to_none=False)``.
    """

    def __init__(self, model: nn.Module, example_batch: Mapping[str, torch.Tensor],
                 compute_loss: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = model_loss,
                 autocast_dtype: torch.dtype | None = None, warmup_steps: int = 3):
        parameters = [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("`model` has no parameters that require gradients: there is no training step to record.")
        device = parameters[0].device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CapturedTrainingStep records a CUDA graph and needs a model on a CUDA device; the "
                             f"model's parameters are on {device}. On other devices, run the step eagerly.")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps}: expected at least 1 (recording needs a step run before).")
        for name, value in example_batch.items():
            if not isinstance(value, torch.Tensor) or value.device != device:
                where = value.device if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"example_batch[{name!r}] is {where}; expected a tensor on the model's device "
                                 f"{device}.")
        self.model, self.compute_loss, self.autocast_dtype, self.device = model, compute_loss, autocast_dtype, device
        self.batch = {name: value.detach().clone() for name, value in example_batch.items()}
        # The warm-up steps show which parameters get gradients (a model may leave some unused, e.g. the global
        # projections without global tokens: they keep .grad None, so an optimizer skips them as it would
        # eagerly). The recorded backward pass then adds into the .grad tensors they leave, as loss.backward()
        # does; the warm-up's gradients are taken back out.
        before = {p: None if p.grad is None else p.grad.clone() for p in parameters}
        # nor do they use up random numbers: the recording starts from the generators' states of before them, so
        # a run that records after resuming draws what an uninterrupted one draws
        random_states = torch.get_rng_state(), torch.cuda.get_rng_state(device)
        stream = _warmup_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), preparing_graph():
            for _ in range(warmup_steps):
                self._run()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.parameters = [p for p in parameters if p.grad is not None]
        with torch.no_grad():
            for p in self.parameters:
                p.grad.zero_() if before[p] is None else p.grad.copy_(before[p])
        self.grads = [p.grad for p in self.parameters]
        self.storage = [p.data_ptr() for p in self.parameters]
        torch.set_rng_state(random_states[0])
        torch.cuda.set_rng_state(random_states[1], device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph), preparing_graph():
                self.loss = self._run(add_into=self.grads)
        except RuntimeError as error:
            first = error  # ending a broken recording raises again: the first error is the informative one
            while isinstance(first.__context__, RuntimeError):
                first = first.__context__
            raise RuntimeError(
                f"Recording the training step as a CUDA graph failed: {first}. The forward pass, loss and backward "
                f"pass must not read values back from the GPU (`.item()`, data-dependent shapes such as the "
                f"number of global tokens: set `max_global_tokens` in the config), copy from host memory, or set "
                f"generator states; run those steps eagerly. No graph of an eager step may be alive (a loss kept "
                f"without .detach()).") from error
        # The graph reads the block masks the FlexAttention paths built before it (the warm-up) by address, but
        # holds no reference to them: it keeps the cached ones alive itself, or their cache could free them.
        self.block_masks = cached_block_masks()
        self.max_global_tokens = getattr(getattr(model, "config", None), "max_global_tokens", None)

    def _run(self, add_into: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One step. ``add_into``: the recorded parameters' .grad tensors, to which the step's gradients are added
        together at the end (`torch._foreach_add_`: a few kernels), instead of by autograd one parameter at a time
        (a kernel each, some hundred per step); meanwhile .grad is None, so autograd hands over its results, which
        the graph's memory holds until the add (one more copy of the gradients)."""
        precision = (contextlib.nullcontext() if self.autocast_dtype is None
                     else torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False))
        with precision:
            loss = self.compute_loss(self.model, self.batch)
        if add_into is None:
            loss.backward()
            return loss.detach()
        try:
            for p in self.parameters:
                p.grad = None
            loss.backward()
            fresh = [p.grad for p in self.parameters]
        finally:
            for p, grad in zip(self.parameters, add_into):
                p.grad = grad
        pairs = [(grad, new) for grad, new in zip(add_into, fresh) if new is not None]
        if pairs:
            with torch.no_grad():
                torch._foreach_add_(*map(list, zip(*pairs)))
        return loss.detach()

    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        if set(batch) != set(self.batch):
            raise ValueError(f"The batch has the keys {sorted(batch)}; this step was recorded with "
                             f"{sorted(self.batch)}.")
        for name, value in batch.items():
            recorded = self.batch[name]
            if not isinstance(value, torch.Tensor) or value.shape != recorded.shape or value.dtype != recorded.dtype:
                got = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"batch[{name!r}] is {got}; this step was recorded with {tuple(recorded.shape)} "
                                 f"{recorded.dtype} (a new shape needs a new CapturedTrainingStep).")
        mask = batch.get("global_attention_mask")
        if mask is not None and self.max_global_tokens is not None:
            # checked here, where it is a ValueError: inside the graph it is a device-side assertion, after which
            # the process's CUDA context is lost
            most = int(mask.ne(0).sum(dim=-1).max()) if mask.numel() else 0
            if most > self.max_global_tokens:
                raise ValueError(f"batch['global_attention_mask'] has a row with {most} global tokens; the model's "
                                 f"config allows max_global_tokens={self.max_global_tokens}.")

    def __call__(self, batch: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if batch is not None:
            self._check_batch(batch)
            for name, value in batch.items():
                self.batch[name].copy_(value, non_blocking=True)
        for p, g, storage in zip(self.parameters, self.grads, self.storage):
            if p.grad is not g:
                raise RuntimeError("A parameter's .grad is no longer the tensor the recorded step writes into (set to "
                                   "None or replaced): zero gradients with `zero_grad(set_to_none=False)`.")
            if p.data_ptr() != storage:
                raise RuntimeError("A parameter's storage is no longer the one the recorded step reads (the model "
                                   "was moved, cast or loaded with assign=True): update parameters in place, or "
                                   "record a new step.")
        self.graph.replay()
        return self.loss
