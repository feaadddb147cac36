"""Switch PNI noise on and off for a whole model.

Noise stays on in ``eval()`` (PNI's robustness at test time comes from it) and under
``torch.no_grad()``; these helpers are the explicit way to get a deterministic model for clean
accuracy checks, export or attacks that need one. Every noisy module also carries its own
``noise_enabled`` flag, which these functions set.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Optional, Union

import torch.nn as nn

from .layers import is_noisy_module

__all__ = ["set_noise", "noise_enabled", "no_noise"]


def _noisy_modules(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if is_noisy_module(m)]


def set_noise(model: nn.Module, enabled: bool) -> nn.Module:
    """Set ``noise_enabled`` on every PNI module of ``model``; returns ``model``.

    Warns when ``model`` holds no PNI module (the call would silently do nothing otherwise).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} ({enabled!r})")
    mods = _noisy_modules(model)
    if not mods:
        warnings.warn(f"set_noise: {type(model).__name__} contains no PNI module; nothing to switch", stacklevel=2)
    for m in mods:
        m.noise_enabled = enabled
    return model


def noise_enabled(model: nn.Module, enabled: Optional[bool] = None) -> Union[bool, nn.Module]:
    """Query or set the noise of ``model``.

    ``noise_enabled(model)`` returns True when any PNI module draws noise;
    ``noise_enabled(model, False)`` is ``set_noise(model, False)`` (returns ``model``).
    """
    if enabled is None:
        return any(m.noise_enabled for m in _noisy_modules(model))
    return set_noise(model, enabled)


@contextlib.contextmanager
def no_noise(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: noise off inside the block, each module's previous flag restored after
    (also on exceptions), so a module that was already off stays off."""
    mods = _noisy_modules(model)
    if not mods:
        warnings.warn(f"no_noise: {type(model).__name__} contains no PNI module", stacklevel=3)
    previous = [(m, m.noise_enabled) for m in mods]
    for m in mods:
        m.noise_enabled = False
    try:
        yield model
    finally:
        for m, flag in previous:
            m.noise_enabled = flag
