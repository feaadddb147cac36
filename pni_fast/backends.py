"""Which kernel runs a PNI op: automatic choice, user override, and an honest status report.

Backends: ``"cpu"`` (C++ CPU kernel), ``"cuda"`` (C++ CUDA kernel), ``"triton"`` and
``"torch"`` (pure PyTorch, the fallback that works everywhere). The automatic choice is
the fastest one available for the tensor's device; ``backend=`` or the environment
variable ``PNI_FAST_BACKEND`` overrides it, and an override that cannot run on that
device is an error rather than a silent substitution.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _ext

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "REGISTRY", "available_backends", "resolve_backend", "info"]


@dataclass(frozen=True)
class Backend:
    """One implementation of the op contract (docs/ops.md): the names of its ``torch.ops.pni_fast`` ops.

    ``perturb_multi`` / ``alpha_grad_multi`` are None where the backend has no list op (the functional
    layer then loops over the single op).
    """

    name: str
    noise: str
    perturb: str
    alpha_grad: str
    perturb_multi: Optional[str] = None
    alpha_grad_multi: Optional[str] = None


_CPP = dict(noise="noise", perturb="perturb", alpha_grad="perturb_alpha_grad", perturb_multi="perturb_multi",
            alpha_grad_multi="perturb_alpha_grad_multi")
REGISTRY: dict[str, Backend] = {
    "cpu": Backend("cpu", **_CPP),
    "cuda": Backend("cuda", **_CPP),
    "triton": Backend(
        "triton",
        noise="noise_triton",
        perturb="perturb_triton",
        alpha_grad="perturb_alpha_grad_triton",
        perturb_multi="perturb_multi_triton",
        alpha_grad_multi="perturb_alpha_grad_multi_triton",
    ),
    "torch": Backend("torch", noise="noise_torch", perturb="perturb_torch", alpha_grad="perturb_alpha_grad_torch"),
}
BACKENDS = tuple(REGISTRY)
ENV_VAR = "PNI_FAST_BACKEND"

_warned_fallback: set[str] = set()


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_unavailable(name: str, device_type: str) -> Optional[str]:
    """None when backend ``name`` can run on ``device_type`` tensors, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got a {device_type} tensor"
        if not _ext.load():
            return f"the C++ extension is not loaded ({_ext.status_message()})"
        return None
    if name == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got a {device_type} tensor"
        if not _ext.load():
            return f"the C++ extension is not loaded ({_ext.status_message()})"
        if not _ext.has_cuda():
            return "the C++ extension was built without CUDA kernels"
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device_type == "cpu" and not _triton_interpreting():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"triton does not run on {device_type} tensors"
        return None
    raise AssertionError(name)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device``, fastest first."""
    device_type = torch.device(device).type
    order = ("cuda", "triton", "torch") if device_type == "cuda" else ("cpu", "triton", "torch")
    return [b for b in order if _why_unavailable(b, device_type) is None]


def _auto(device_type: str, warn: bool = True) -> str:
    preferred = ("cuda", "triton") if device_type == "cuda" else ("cpu",)
    for name in preferred:
        if _why_unavailable(name, device_type) is None:
            return name
    if warn and device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        reasons = "; ".join(f"{n}: {_why_unavailable(n, device_type)}" for n in preferred)
        warnings.warn(
            f"pni_fast: no fused kernel for {device_type} tensors ({reasons}); "
            "using the pure-PyTorch backend (same noise, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def resolve_backend(name: Optional[str], device: torch.device | str) -> str:
    """The backend to use for a tensor on ``device``: ``name``, else ``$PNI_FAST_BACKEND``, else automatic.

    Raises ValueError for an unknown name and RuntimeError when the named backend cannot run here.
    """
    source = "backend"
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        source = ENV_VAR
    device_type = torch.device(device).type
    if name is None or name == "auto":
        return _auto(device_type)
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))} or None, got {name!r}")
    reason = _why_unavailable(name, device_type)
    if reason is not None:
        raise RuntimeError(f"{source}={name!r} cannot run here: {reason}")
    return name


def info() -> str:
    """A human-readable report of the installed backends and why any is missing."""
    lines = [
        f"pni_fast backends (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})",
        f"  C++ extension: {_ext.status_message()}",
    ]
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dt in device_types:
        for name in BACKENDS:
            reason = _why_unavailable(name, dt)
            if name in ("cpu", "cuda") and name != dt:
                continue
            lines.append(f"  {dt:4s} {name:6s} {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append(f"  {dt:4s} automatic choice -> {_auto(dt, warn=False)}")
    if os.environ.get(ENV_VAR):
        lines.append(f"  {ENV_VAR}={os.environ[ENV_VAR]}")
    return "\n".join(lines)
