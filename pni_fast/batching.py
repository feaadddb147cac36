"""Whole-model weight noise in one multi-tensor call per forward (and one alpha-gradient call per backward).

A forward pre-hook on the model draws every PNI layer's noisy weight with one
:func:`pni_fast.noisy_weights` call and hands each layer its result (``_pni_pending_weight``,
read once by the layer's forward); a forward hook clears what a forward did not use.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from . import functional as _fn
from .modules import NoisyConv2d, NoisyLinear, _refuse_frozen_capture

__all__ = ["batch_weight_noise", "installed_batch", "remove_batching"]


class _WeightNoiseBatch:
    """Handle returned by ``batch_weight_noise``; ``remove()`` restores per-layer noise."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [m for m in dict.fromkeys(model.modules()) if isinstance(m, (NoisyConv2d, NoisyLinear))]
        self._handles = [
            model.register_forward_pre_hook(self._draw),
            model.register_forward_hook(self._clear, always_call=True),
        ]

    def _draw(self, module: nn.Module, args: Any) -> None:
        layers = [m for m in self.layers if m.noise_enabled and m.alpha_w is not None]
        if not layers:
            return
        _refuse_frozen_capture()
        noisy = _fn.noisy_weights([m.weight for m in layers], [m.alpha_w for m in layers])
        for m, w in zip(layers, noisy):
            m.__dict__["_pni_pending_weight"] = w

    def _clear(self, module: nn.Module, args: Any, output: Any) -> None:
        for m in self.layers:  # a layer the forward skipped must not keep a stale draw (or its graph)
            m.__dict__["_pni_pending_weight"] = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._clear(self.model, None, None)

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
    turns it off). Per forward: one seed, one sigma per layer, one multi-tensor perturb call; per
    backward: one multi-tensor alpha-gradient call, whatever the number of layers. The result equals
    per-layer calls under that seed with consecutive counter ranges (layer ``k`` starts where layer
    ``k-1`` ended, in ``model.modules()`` order). So the noise differs from the unbatched model for the
    same ``torch.manual_seed`` (one seed per forward instead of one per layer). A layer called twice in
    one forward draws fresh per-layer noise for its second call; layers switched off with ``no_noise``
    are left out; input noise stays per layer. The PNI layers are collected now (call after ``convert``);
    calling it again on the same model returns the installed handle. Returns a handle with ``remove()``
    (also a context manager).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    existing = installed_batch(model)
    if existing is not None:
        return existing
    batch = _WeightNoiseBatch(model)
    if warn and not batch.layers:
        import warnings

        warnings.warn(f"batch_weight_noise: {type(model).__name__} has no NoisyConv2d/NoisyLinear layer", stacklevel=2)
    return batch
