"""sigma, PNI's noise scale ``std(v)``: one definition per (device, dtype), whichever backend runs.

Computed on the tensor's device as a detached 0-d tensor (no ``.item()``, no host sync). On CPU the
C++ ``sigma`` / ``sigma_multi`` ops compute it in one deterministic pass; without the compiled
library ``sigma_torch`` gives the same value with tensor ops (docs/design.md section 2.2).

On CUDA, sigma is ``torch.std`` in float32 (one torch reduction per layer) unless
``PNI_FAST_CUDA_SIGMA=1``: then it has the CPU definition (float64 two-pass, rounded once to float32),
computed by the CUDA ``sigma`` / ``sigma_multi`` kernels (csrc/cuda/sigma_cuda.cu; one launch for
many small tensors) or, where they cannot run (no CUDA build, vmap), by the same tensor ops as on
CPU. The switch is process-wide, so every backend on CUDA sees one definition; it is off by default
until the kernels have run on a GPU (scripts/gpu_check.sh runs tests/ops/test_sigma.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .. import _build_config, _ext
from ..contract import check_tensor, opmath
from ..rng import under_vmap
from .call import trace_constant

__all__ = ["weight_sigma", "weight_sigmas", "sigma_torch", "cuda_sigma_switch", "CUDA_SIGMA_ENV"]


def _std_scaled(t: Tensor) -> Tensor:
    """Unbiased std of a float64 tensor whose squares may overflow: scale by max|t - mean| first."""
    m = t.mean()
    d = t - m
    scale = d.abs().amax()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (d / safe).std() * safe


CUDA_SIGMA_ENV = "PNI_FAST_CUDA_SIGMA"


@trace_constant
def cuda_sigma_switch() -> bool:
    """``PNI_FAST_CUDA_SIGMA=1``: sigma on CUDA has the CPU definition, computed by the CUDA sigma kernels."""
    return _build_config.env_flag(CUDA_SIGMA_ENV)


def _f64_definition(device_type: str) -> bool:
    """Whether sigma on this device is the float64 two-pass std rounded once (else float32 ``torch.std``)."""
    return device_type == "cpu" or (device_type == "cuda" and cuda_sigma_switch())


def sigma_torch(t: Tensor) -> Tensor:
    """The pure-PyTorch sigma. CPU (and CUDA with PNI_FAST_CUDA_SIGMA=1): float64 two-pass, rounded once
    (the C++ ``sigma`` op's definition)."""
    if _f64_definition(t.device.type) or t.dtype == torch.float64:
        d = t.to(torch.float64)
        if t.dtype == torch.float64:
            s = d.std()
            if (
                t.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and not under_vmap()
                and not math.isfinite(float(s))
            ):
                s = _std_scaled(d)  # finite tensors whose squares overflow float64
            return s
        m = d.mean()
        return torch.sqrt(((d - m) ** 2).sum() / (d.numel() - 1)).to(torch.float32)
    return t.to(torch.float32).std()


def weight_sigma(t: Tensor) -> Tensor:
    """Detached unbiased ``std`` as a 0-d tensor on ``t``'s device (float32, float64 for float64).

    A tensor with fewer than 2 elements has no spread: sigma is 0 and the op returns it unchanged.
    On CPU, float16/bfloat16/float32 sigma is the float64 two-pass std rounded once to float32 on every
    backend (so the first call in a process equals later ones); float64 sigma is ``torch.std``.
    """
    t = t.detach()
    if t.numel() < 2:
        return torch.zeros((), dtype=opmath(t.dtype), device=t.device)
    if t.dtype != torch.float64 and not under_vmap() and _fused_sigma(t.device.type):
        return torch.ops.pni_fast.sigma(t)  # the same definition in one fused pass
    return sigma_torch(t)


def _fused_sigma(device_type: str, op: str = "sigma") -> bool:
    """Whether the compiled ``op`` (sigma / sigma_multi) computes sigma on this device type."""
    if device_type == "cpu":
        return _cpp_sigma_multi_available() if op == "sigma_multi" else _cpp_sigma_available()
    if device_type == "cuda":
        return cuda_sigma_switch() and _cuda_sigma_kernels()
    return False


def weight_sigmas(ts: Sequence[Tensor]) -> list[Tensor]:
    """:func:`weight_sigma` of many tensors, bit-identical per tensor; on CPU one ``sigma_multi`` call per dtype
    (one pass over all of them) instead of a call per tensor."""
    ts = list(ts)
    for k, t in enumerate(ts):
        check_tensor(f"ts[{k}]", t)
    ts = [t.detach() for t in ts]
    if not ts or under_vmap() or not _fused_sigma(ts[0].device.type, "sigma_multi"):
        return [weight_sigma(t) for t in ts]
    out: list[Optional[Tensor]] = [None] * len(ts)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for k, t in enumerate(ts):
        if t.dtype == torch.float64 or t.numel() < 2 or t.device != ts[0].device:
            out[k] = weight_sigma(t)
        else:
            groups.setdefault((t.device, t.dtype), []).append(k)
    for idx in groups.values():
        for k, s in zip(idx, torch.ops.pni_fast.sigma_multi([ts[k] for k in idx]).unbind(0)):
            out[k] = s
    return out  # type: ignore[return-value]


@trace_constant
def _cuda_sigma_kernels() -> bool:
    """The compiled library has the CUDA sigma and sigma_multi kernels: a trace-time constant."""
    return _ext.load() and _ext.has_op("sigma", "cuda") and _ext.has_op("sigma_multi", "cuda")


@trace_constant
def _cpp_sigma_multi_available() -> bool:
    return _ext.load() and _ext.has_op("sigma_multi", "cpu")


@trace_constant
def _cpp_sigma_available() -> bool:
    """The compiled library (loaded now if it can be) has pni_fast::sigma: a trace-time constant."""
    return _ext.load() and _ext.has_op("sigma", "cpu")
