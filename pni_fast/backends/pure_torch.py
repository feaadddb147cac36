"""The pure-PyTorch backend: the op contract (docs/ops.md) implemented with tensor ops.

Registered as custom ops (``torch.ops.pni_fast.*_torch``) with the same schemas as the C++ ops,
so dispatch, autograd and ``torch.compile`` treat every backend alike. It runs on any device,
draws exactly the contract's noise and is the fallback when no compiled kernel is available.
Every op and fake kernel first runs the contract's argument checks (:mod:`pni_fast.contract`),
so it fails like the C++ and Triton ops.

Its RNG is the contract's (docs/design.md section 3) in integer tensor ops: Philox4x32-10 on
int64 lanes holding 32-bit values, the word -> uniform map and fp32 Box-Muller, so a device
without a compiled kernel still draws exactly the noise the fused kernels draw for a
``(seed, offset)``. ``seed`` and ``offset`` may be Python ints or 0-d int64 tensors on the
device (the graph-safe ``rng_state`` path reads them without a host sync).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import contract
from ..contract import alpha_view, opmath, quads

__all__ = [
    "philox4x32_10_torch",
    "philox_words_torch",
    "uniform_from_words_torch",
    "randn_torch",
    "noise_torch",
    "perturb_torch",
    "perturb_alpha_grad_torch",
]

# ---------------------------------------------------------------------------
# The contract's RNG in tensor ops
# ---------------------------------------------------------------------------

IntLike = Union[int, torch.Tensor]

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
    counters = torch.arange(quads(numel), dtype=torch.int64, device=device) + offset
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


# ---------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------


def _seed_offset(numel: int, seed: int, offset: int, rng_state: Optional[Tensor]):
    """The (seed, counter offset) the op uses: host ints, or values read from ``rng_state``."""
    if rng_state is None:
        return seed, offset
    if rng_state.device.type == "cpu":  # no sync: read on the host like the C++ CPU kernel
        s, base = (int(v) for v in rng_state.tolist())
        return s, base + offset
    return rng_state[0], rng_state[1] + offset  # stays on the device: graph-safe


def _fresh(t: Tensor) -> Tensor:
    """A result that is not a view: autograd refuses in-place ops (``ReLU(inplace=True)``) on views
    created inside a custom op."""
    return t.clone() if t._base is not None else t


def _z(numel: int, seed: int, offset: int, rng_state: Optional[Tensor], device) -> Tensor:
    s, o = _seed_offset(numel, seed, offset, rng_state)
    return randn_torch(numel, s, o, device)


@torch.library.custom_op("pni_fast::noise_torch", mutates_args=())
def noise_torch(like: Tensor, seed: int, offset: int, rng_state: Optional[Tensor] = None) -> Tensor:
    contract.check_noise("noise_torch", like, seed, offset, rng_state)
    return _z(like.numel(), seed, offset, rng_state, like.device).reshape(like.shape)


@noise_torch.register_fake
def _(like, seed, offset, rng_state=None):
    contract.check_noise("noise_torch", like, seed, offset, rng_state)
    return like.new_empty(like.shape, dtype=torch.float32)


@torch.library.custom_op("pni_fast::perturb_torch", mutates_args=())
def perturb_torch(
    v: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int, rng_state: Optional[Tensor] = None
) -> Tensor:
    contract.check_perturb("perturb_torch", "v", v, alpha, sigma, seed, offset, inner, rng_state)
    if v.numel() == 0:  # any alpha fits a zero-size tensor
        return torch.empty_like(v, memory_format=torch.contiguous_format)
    om = opmath(v.dtype)
    shape, a = alpha_view(alpha.to(om), v.numel(), inner)
    z = _z(v.numel(), seed, offset, rng_state, v.device).to(om).reshape(shape)
    out = v.to(om).reshape(shape) + (a * sigma.to(om)) * z
    return _fresh(out.to(v.dtype).reshape(v.shape))


@perturb_torch.register_fake
def _(v, alpha, sigma, seed, offset, inner, rng_state=None):
    contract.check_perturb("perturb_torch", "v", v, alpha, sigma, seed, offset, inner, rng_state)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("pni_fast::perturb_alpha_grad_torch", mutates_args=())
def perturb_alpha_grad_torch(
    grad: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int, rng_state: Optional[Tensor] = None
) -> Tensor:
    contract.check_perturb("perturb_alpha_grad_torch", "grad", grad, alpha, sigma, seed, offset, inner, rng_state)
    if grad.numel() == 0:
        return torch.zeros_like(alpha, memory_format=torch.contiguous_format)
    om = opmath(grad.dtype)
    shape, _ = alpha_view(alpha, grad.numel(), inner)
    z = _z(grad.numel(), seed, offset, rng_state, grad.device).to(om).reshape(shape)
    partial = (grad.to(om).reshape(shape) * z).sum(dim=(0, 2))
    return _fresh((partial * sigma.to(om)).reshape(alpha.shape).to(alpha.dtype))


@perturb_alpha_grad_torch.register_fake
def _(grad, alpha, sigma, seed, offset, inner, rng_state=None):
    contract.check_perturb("perturb_alpha_grad_torch", "grad", grad, alpha, sigma, seed, offset, inner, rng_state)
    return torch.empty_like(alpha, memory_format=torch.contiguous_format)
