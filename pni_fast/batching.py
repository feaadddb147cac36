"""Whole-model weight noise in one multi-tensor call per forward (and one alpha-gradient call per backward).

A forward pre-hook on the model draws every PNI layer's noisy weight with one
:func:`pni_fast.noisy_weights` call and hands each layer its result (``_pni_pending_weight``,
read once by the layer's forward); a forward hook clears what a forward did not use.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from . import functional as _fn
from .modules import NoisyConv2d, NoisyLinear, _refuse_frozen_capture

__all__ = ["batch_weight_noise"]


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

    def __enter__(self) -> "_WeightNoiseBatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def batch_weight_noise(model: nn.Module) -> _WeightNoiseBatch:
    """Draw the weight noise of every PNI layer of ``model`` in one multi-tensor op per forward.

    With many small layers (a CIFAR ResNet has 20) one launch replaces one per layer where the
    backend has a multi-tensor kernel (CUDA, Triton, C++ CPU); the result equals per-layer calls
    under one seed with consecutive counter ranges. Each forward of ``model`` then draws one seed
    instead of one per layer (so the noise differs from the unbatched model for the same
    ``torch.manual_seed``). A layer called twice in one forward draws fresh noise for its second
    call. The PNI layers are collected now: call this after ``convert`` (and ``remove()`` it before ``strip``). Returns a handle with
    ``remove()`` (also a context manager). Input noise stays per layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    batch = _WeightNoiseBatch(model)
    if not batch.layers:
        import warnings

        warnings.warn(f"batch_weight_noise: {type(model).__name__} has no NoisyConv2d/NoisyLinear layer",
                      stacklevel=2)
    return batch
