"""Plain-PyTorch PNI: the truth for the math, and the pure-PyTorch backend's RNG.

Two things live here:

* The paper-faithful reference (``reference_noisy_weight``, ``ReferenceNoisyConv2d``,
  ``ReferenceNoisyLinear``): written the way the original PNI code does it —
  ``std().item()`` (a host sync), a stored noise tensor drawn with ``normal_`` —
  so tests can compare against it and benchmarks can show what the fused ops save.
  ``compile_friendly_noisy_weight`` is the same math without ``.item()``, the fair
  baseline for ``torch.compile``.
* ``philox4x32_10_torch`` / ``randn_torch``: the RNG contract of design.md
  section 3 in integer tensor ops, so every device without a compiled kernel still
  draws exactly the noise the fused kernels draw for a given ``(seed, offset)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "reference_noisy_weight",
    "compile_friendly_noisy_weight",
    "reference_inject_noise",
    "ReferenceNoisyConv2d",
    "ReferenceNoisyLinear",
    "philox4x32_10_torch",
    "philox_words_torch",
    "uniform_from_words_torch",
    "randn_torch",
    "alpha_view",
]

# ---------------------------------------------------------------------------
# Paper-faithful PNI
# ---------------------------------------------------------------------------


def alpha_view(alpha: torch.Tensor, numel: int, inner: int) -> tuple[tuple[int, int, int], torch.Tensor]:
    """Shapes that broadcast alpha by the contract's rule ``alpha[(i // inner) % n_alpha]``.

    Returns the ``(outer, n_alpha, inner)`` view for the flattened tensor and alpha viewed
    as ``(1, n_alpha, 1)``; a layerwise alpha becomes ``(1, 1, 1)``.
    """
    n_alpha = alpha.numel()
    if n_alpha == 1:
        return (numel, 1, 1), alpha.reshape(1, 1, 1)
    block = n_alpha * inner
    if inner < 1 or numel % block != 0:
        raise ValueError(
            f"alpha with {n_alpha} elements and inner={inner} does not tile a tensor of {numel} elements"
        )
    return (numel // block, n_alpha, inner), alpha.reshape(1, n_alpha, 1)


def reference_noisy_weight(
    weight: torch.Tensor, alpha: torch.Tensor, z: Optional[torch.Tensor] = None
) -> torch.Tensor:
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


# ---------------------------------------------------------------------------
# The RNG contract in integer tensor ops (int64 lanes holding 32-bit values)
# ---------------------------------------------------------------------------

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``m * c`` for 32-bit ``m`` and ``c`` without int64 overflow."""
    c_lo = c & 0xFFFF
    c_hi = c >> 16
    a = m * c_lo  # < 2^48
    b = m * c_hi  # < 2^48
    s = a + ((b & 0xFFFF) << 16)  # < 2^49
    hi = (b >> 16) + (s >> 32)
    return hi & _MASK32, s & _MASK32


def philox4x32_10_torch(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 words, shape ``(n, 4)`` int64 in [0, 2^32), for int64 counters (c2 = c3 = 0)."""
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_words_torch(numel: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """Flat words in element order (length ``4 * ceil(numel / 4)``), int64 in [0, 2^32)."""
    n_quads = -(-numel // 4)
    counters = torch.arange(n_quads, dtype=torch.int64, device=device) + offset
    return philox4x32_10_torch(counters, seed).reshape(-1)


def uniform_from_words_torch(words: torch.Tensor) -> torch.Tensor:
    """The contract's word -> uniform map, bit-identical to the kernels' ``int32``/``~v`` route."""
    v = torch.where(words >= 0x80000000, words ^ _MASK32, words)  # == ~int32(x) for negative int32(x)
    return v.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=words.device)


def randn_torch(numel: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """Flat float32 ``z`` of ``numel`` elements under the contract (fp32 Box-Muller)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    u = uniform_from_words_torch(philox_words_torch(numel, seed, offset, device)).reshape(-1, 2, 2)
    u1 = torch.clamp_min(u[:, :, 0], 1e-7)
    t = u[:, :, 1] * torch.tensor(6.2831855, dtype=torch.float32, device=u.device)
    r = torch.sqrt(torch.log(u1) * -2.0)
    z = torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=-1)
    return z.reshape(-1)[:numel]
