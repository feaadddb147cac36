"""The pure-PyTorch backend: the fused ops' signatures implemented with tensor ops.

Registered as custom ops (``torch.ops.pni_fast.*_torch``) with the same schemas as the C++
ops (docs/ops.md), so dispatch, autograd and ``torch.compile`` treat every backend alike.
It runs on any device, draws exactly the contract's noise and is the fallback when no
compiled kernel is available. Every op and fake kernel first runs the contract's argument checks
(:mod:`pni_fast.op_checks`), so it fails like the C++ and Triton ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import op_checks
from .philox_torch import alpha_view, randn_torch

__all__ = ["opmath", "check_alpha_dtype"]

_HALF = (torch.float16, torch.bfloat16)


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_alpha_dtype(alpha: Tensor, dtype: torch.dtype, name: str) -> None:
    """alpha has the tensor's dtype, or float32 with a float16/bfloat16 tensor (AMP keeps parameters fp32):
    the op contract's ``alpha_dtype`` rule, for the public functions (``name``: "weight", "x", ...)."""
    half = dtype in _HALF
    op_checks.require(
        alpha.dtype == dtype or (half and alpha.dtype == torch.float32),
        "alpha_dtype",
        "",
        dtype=dtype,
        vname=name,
        or_float32=" or torch.float32" if half else "",
        alpha_dtype=alpha.dtype,
    )


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
    op_checks.check_noise("noise_torch", like, seed, offset, rng_state)
    return _z(like.numel(), seed, offset, rng_state, like.device).reshape(like.shape)


@noise_torch.register_fake
def _(like, seed, offset, rng_state=None):
    op_checks.check_noise("noise_torch", like, seed, offset, rng_state)
    return like.new_empty(like.shape, dtype=torch.float32)


@torch.library.custom_op("pni_fast::perturb_torch", mutates_args=())
def perturb_torch(
    v: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int, rng_state: Optional[Tensor] = None
) -> Tensor:
    op_checks.check_perturb("perturb_torch", "v", v, alpha, sigma, seed, offset, inner, rng_state)
    if v.numel() == 0:  # any alpha fits a zero-size tensor
        return torch.empty_like(v, memory_format=torch.contiguous_format)
    om = opmath(v.dtype)
    shape, a = alpha_view(alpha.to(om), v.numel(), inner)
    z = _z(v.numel(), seed, offset, rng_state, v.device).to(om).reshape(shape)
    out = v.to(om).reshape(shape) + (a * sigma.to(om)) * z
    return _fresh(out.to(v.dtype).reshape(v.shape))


@perturb_torch.register_fake
def _(v, alpha, sigma, seed, offset, inner, rng_state=None):
    op_checks.check_perturb("perturb_torch", "v", v, alpha, sigma, seed, offset, inner, rng_state)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("pni_fast::perturb_alpha_grad_torch", mutates_args=())
def perturb_alpha_grad_torch(
    grad: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int, rng_state: Optional[Tensor] = None
) -> Tensor:
    op_checks.check_perturb("perturb_alpha_grad_torch", "grad", grad, alpha, sigma, seed, offset, inner, rng_state)
    if grad.numel() == 0:
        return torch.zeros_like(alpha, memory_format=torch.contiguous_format)
    om = opmath(grad.dtype)
    shape, _ = alpha_view(alpha, grad.numel(), inner)
    z = _z(grad.numel(), seed, offset, rng_state, grad.device).to(om).reshape(shape)
    partial = (grad.to(om).reshape(shape) * z).sum(dim=(0, 2))
    return _fresh((partial * sigma.to(om)).reshape(alpha.shape).to(alpha.dtype))


@perturb_alpha_grad_torch.register_fake
def _(grad, alpha, sigma, seed, offset, inner, rng_state=None):
    op_checks.check_perturb("perturb_alpha_grad_torch", "grad", grad, alpha, sigma, seed, offset, inner, rng_state)
    return torch.empty_like(alpha, memory_format=torch.contiguous_format)
