"""Whole-model weight noise in one multi-tensor call per forward (and one alpha-gradient call per backward).

Batching is an optimisation that never changes the numbers. Every PNI layer call draws its own seed
from the generator (:func:`pni_fast.draw_seed`), batched or not, and its noise is
``noisy_weight(weight, alpha, seed=that seed)``: a pure function of the generator's state at the call,
like any torch random op. A forward pre-hook on the model reads the seeds the layers are about to draw
from a *copy* of the generator (:func:`pni_fast.rng.predict_seeds`, module order) and draws every
layer's noisy weight with them in one :func:`pni_fast.noisy_weights` call (one Philox key per tensor).
The result sits on a per-thread stack (:class:`pni_fast.nn.noise_calls.ForwardDraws`) for that forward
only; each layer takes its tensor when the seed it drew is the predicted one and otherwise computes
its own (same bits, one call). So:

* activation checkpointing (reentrant or not) replays torch's generator, the layers draw the same
  seeds again and recompute the same bits; inside non-reentrant checkpointing (saved-tensor hooks
  active) layers make their own call, as the recompute will;
* threads never share a draw (the stack is per thread); when their draws interleave on the shared
  generator, predictions miss and layers fall back to their own calls;
* ``torch.func`` transforms, ``torch.compile``, export, tracing and CUDA-graph capture run the
  per-layer calls (no prediction there).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .. import functional as _fn
from ..rng import predict_seeds
from .layers import NoiseInjection, PNIMixin
from .noise_calls import ForwardDraws, active_draws

__all__ = ["batch_weight_noise", "installed_batch", "remove_batching"]


def _predictable() -> bool:
    """Plain eager calls only: elsewhere the seeds are traced, per-sample or read from a device state."""
    return not (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _WeightNoiseBatch:
    """Handle returned by ``batch_weight_noise``; ``remove()`` restores per-layer noise."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # every module that draws seeds in a forward, in module order (the order their draws are predicted)
        self.drawers = [m for m in dict.fromkeys(model.modules()) if isinstance(m, (PNIMixin, NoiseInjection))]
        self.layers = [m for m in self.drawers if isinstance(m, PNIMixin)]
        self._handles = [
            model.register_forward_pre_hook(self._draw),
            model.register_forward_hook(self._clear, always_call=True),
        ]

    def _draw(self, module: nn.Module, args: Any) -> None:
        if not _predictable():
            return
        slots: list = []  # (layer, takes weight noise): one per seed the forward's PNI modules will draw
        for m in self.drawers:
            if not m.noise_enabled:
                continue
            if isinstance(m, NoiseInjection):
                slots.append((m, False))
                continue
            if m.alpha_w is not None:
                slots.append((m, True))  # weight noise is drawn before input noise
            if m.alpha_i is not None:
                slots.append((m, False))
        layers = [m for m, weight in slots if weight]
        if not layers or _capturing(layers[0].weight.device):
            return
        seeds = [s for (_, weight), s in zip(slots, predict_seeds(len(slots))) if weight]
        noisy = _fn.noisy_weights([m.weight for m in layers], [m.alpha_w for m in layers], seed=seeds)
        entries = {m: (s, w) for m, s, w in zip(layers, seeds, noisy)}
        active_draws().append(ForwardDraws(self, entries, torch.is_grad_enabled()))

    def _clear(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        stack = active_draws()  # a forward that drew nothing pushed nothing: removing less is only slower
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].owner is self:
                del stack[i]
                return

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> _WeightNoiseBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def installed_batch(model: nn.Module) -> Optional[_WeightNoiseBatch]:
    """The batching handle whose hooks sit on ``model``, if any."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, _WeightNoiseBatch):
            return owner
    return None


def remove_batching(model: nn.Module) -> bool:
    """Remove whole-model batching from ``model`` and its submodules (used by ``strip``); True if any was there."""
    found = False
    for m in model.modules():
        handle = installed_batch(m)
        while handle is not None:
            handle.remove()
            found = True
            handle = installed_batch(m)
    return found


def batch_weight_noise(model: nn.Module, *, warn: bool = True) -> _WeightNoiseBatch:
    """Draw the weight noise of every PNI layer of ``model`` in one multi-tensor op per forward.

    ``convert`` (and ``pni_fast.models``) install this by default (``convert(..., batch_noise=False)``
    turns it off). Per forward: one prediction of the layers' seeds, one sigma per layer, one
    multi-tensor perturb call; per backward: one multi-tensor alpha-gradient call, whatever the number
    of layers. The numbers are those of the unbatched model, bit for bit, for the same generator state:
    each layer's noise is ``noisy_weight(weight, alpha, seed)`` with the seed the layer draws at its
    call. The prediction assumes the PNI modules draw in module order and that nothing else draws from
    the generator in between (a CPU dropout, a layer called twice); where that fails, the layers from
    there on make their own calls (same numbers, more calls). The PNI layers are collected now (call
    after ``convert``); calling it again on the same model returns the installed handle. Returns a
    handle with ``remove()`` (also a context manager).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(warn, bool):
        raise TypeError(f"warn must be a bool, got {type(warn).__name__} ({warn!r})")
    existing = installed_batch(model)
    if existing is not None:
        return existing
    batch = _WeightNoiseBatch(model)
    if warn and not batch.layers:
        import warnings

        warnings.warn(f"batch_weight_noise: {type(model).__name__} has no NoisyConv2d/NoisyLinear layer", stacklevel=2)
    return batch
