"""The RNG contract (docs/design.md section 3) in integer tensor ops.

Philox4x32-10 on int64 lanes holding 32-bit values, the contract's word -> uniform map and
fp32 Box-Muller, so a device without a compiled kernel still draws exactly the noise the
fused kernels draw for a ``(seed, offset)``. ``seed`` and ``offset`` may be Python ints or
0-d int64 tensors on the device (the graph-safe ``rng_state`` path reads them without a
host sync).
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = [
    "philox4x32_10_torch",
    "philox_words_torch",
    "uniform_from_words_torch",
    "randn_torch",
    "alpha_view",
]

IntLike = Union[int, torch.Tensor]

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def alpha_view(alpha: torch.Tensor, numel: int, inner: int) -> tuple[tuple[int, int, int], torch.Tensor]:
    """Shapes that broadcast alpha by the contract's rule ``alpha[(i // inner) % n_alpha]``.

    Returns the ``(outer, n_alpha, inner)`` view for the flattened tensor and alpha viewed
    as ``(1, n_alpha, 1)``; a layerwise alpha becomes ``(1, 1, 1)``.
    """
    n_alpha = alpha.numel()
    if n_alpha == 1 or numel == 0:  # a zero-size tensor takes no alpha value
        return (numel, 1, 1), alpha.reshape(-1)[:1].reshape(1, 1, 1)
    block = n_alpha * inner
    if inner < 1 or numel % block != 0:
        raise ValueError(f"alpha with {n_alpha} elements and inner={inner} does not tile a tensor of {numel} elements")
    return (numel // block, n_alpha, inner), alpha.reshape(1, n_alpha, 1)


def _mulhilo32(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``m * c`` for 32-bit ``m`` and ``c`` without int64 overflow."""
    c_lo = c & 0xFFFF
    c_hi = c >> 16
    a = m * c_lo  # < 2^48
    b = m * c_hi  # < 2^48
    s = a + ((b & 0xFFFF) << 16)  # < 2^49
    hi = (b >> 16) + (s >> 32)
    return hi & _MASK32, s & _MASK32


def philox4x32_10_torch(counters: torch.Tensor, seed: IntLike) -> torch.Tensor:
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


def philox_words_torch(numel: int, seed: IntLike, offset: IntLike, device=None) -> torch.Tensor:
    """Flat words in element order (length ``4 * ceil(numel / 4)``), int64 in [0, 2^32)."""
    n_quads = -(-numel // 4)
    counters = torch.arange(n_quads, dtype=torch.int64, device=device) + offset
    return philox4x32_10_torch(counters, seed).reshape(-1)


def uniform_from_words_torch(words: torch.Tensor) -> torch.Tensor:
    """The contract's word -> uniform map, bit-identical to the kernels' ``int32``/``~v`` route."""
    v = torch.where(words >= 0x80000000, words ^ _MASK32, words)  # == ~int32(x) for negative int32(x)
    return v.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=words.device)


def randn_torch(numel: int, seed: IntLike, offset: IntLike, device=None) -> torch.Tensor:
    """Flat float32 ``z`` of ``numel`` elements under the contract (fp32 Box-Muller)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    u = uniform_from_words_torch(philox_words_torch(numel, seed, offset, device)).reshape(-1, 2, 2)
    u1 = torch.clamp_min(u[:, :, 0], 1e-7)
    t = u[:, :, 1] * torch.tensor(6.2831855, dtype=torch.float32, device=u.device)
    r = torch.sqrt(torch.log(u1) * -2.0)
    z = torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=-1)
    return z.reshape(-1)[:numel]
