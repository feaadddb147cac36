"""Plain-PyTorch PNI: the truth for the math.

The paper-faithful reference (``reference_noisy_weight``, ``ReferenceNoisyConv2d``,
  ``ReferenceNoisyLinear``): written the way the original PNI code does it —
  ``std().item()`` (a host sync), a stored noise tensor drawn with ``normal_`` —
  so tests can compare against it and benchmarks can show what the fused ops save.
  ``compile_friendly_noisy_weight`` is the same math without ``.item()``, the fair
  baseline for ``torch.compile``.

The noise itself (the RNG contract) is checked against an independent numpy Philox in the tests;
the pure-PyTorch backend's Philox is :mod:`pni_fast.backends.pure_torch`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import alpha_view

__all__ = [
    "reference_noisy_weight",
    "compile_friendly_noisy_weight",
    "reference_inject_noise",
    "ReferenceNoisyConv2d",
    "ReferenceNoisyLinear",
]

# ---------------------------------------------------------------------------
# Paper-faithful PNI
# ---------------------------------------------------------------------------


def reference_noisy_weight(weight: torch.Tensor, alpha: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w + alpha * N(0, std(w))`` exactly as the original PNI layers compute it.

    ``alpha`` broadcasts against ``weight`` (scalar, ``[O, 1, ...]`` or the weight's shape).
    ``z`` (unit normal, the weight's shape) replaces the fresh draw so a kernel's noise can be
    checked against this math; the scaled noise is stored for backward like the original.
    """
    with torch.no_grad():
        std = weight.std().item()  # host sync, as in the original code
        if z is None:
            noise = weight.clone().normal_(0, std)
        else:
            noise = z.to(weight.dtype) * std
    return weight + alpha * noise


def compile_friendly_noisy_weight(
    weight: torch.Tensor, alpha: torch.Tensor, z: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The same math with sigma kept as a 0-d device tensor (no ``.item()``): the fair eager and
    ``torch.compile`` baseline."""
    sigma = weight.detach().std()
    if z is None:
        z = torch.randn_like(weight)
    return weight + alpha * (sigma * z)


def reference_inject_noise(
    x: torch.Tensor, alpha: torch.Tensor, inner: int = 1, z: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Activation noise ``x + alpha[b(i)] * std(x) * z`` with the contract's alpha rule."""
    shape, a = alpha_view(alpha, x.numel(), inner)
    with torch.no_grad():
        std = x.std().item()
        noise = torch.randn_like(x) if z is None else z.to(x.dtype)
        noise = noise * std
    return (x.reshape(shape) + a * noise.reshape(shape)).reshape(x.shape)


def _check_pni_mode(pni: str) -> None:
    if pni not in ("layerwise", "channelwise", "elementwise"):
        raise ValueError(f"pni must be 'layerwise', 'channelwise' or 'elementwise', got {pni!r}")


def _reference_alpha(weight: torch.Tensor, pni: str, alpha_init: float) -> nn.Parameter:
    if pni == "layerwise":
        shape: tuple[int, ...] = (1,)
    elif pni == "channelwise":
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    else:
        shape = tuple(weight.shape)
    return nn.Parameter(torch.full(shape, float(alpha_init), device=weight.device, dtype=weight.dtype))


class _ReferenceAlpha:
    """Adds the original code's ``alpha_w`` to a torch layer (after its own __init__)."""

    def _add_alpha(self, pni: str, alpha_init: float) -> None:
        _check_pni_mode(pni)
        self.pni = pni
        self.alpha_w = _reference_alpha(self.weight, pni, alpha_init)


class ReferenceNoisyConv2d(_ReferenceAlpha, nn.Conv2d):
    """The original PNI-W convolution (``alpha_w``, ``std().item()``, stored noise): benchmark baseline."""

    def __init__(self, *args, pni: str = "layerwise", alpha_init: float = 0.25, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._add_alpha(pni, alpha_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, reference_noisy_weight(self.weight, self.alpha_w), self.bias)


class ReferenceNoisyLinear(_ReferenceAlpha, nn.Linear):
    """The original PNI-W linear layer: benchmark baseline."""

    def __init__(self, *args, pni: str = "layerwise", alpha_init: float = 0.25, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._add_alpha(pni, alpha_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, reference_noisy_weight(self.weight, self.alpha_w), self.bias)
