"""Which kernel runs a PNI op: a registry of backends, automatic choice, user override, honest status.

Every implementation of the op contract (docs/ops.md) is one :class:`Backend` entry in
:data:`REGISTRY`: its op names, the devices it serves, its priority for the automatic choice,
and a check that says why it cannot run. Dispatch, :func:`available_backends`, :func:`info`,
the functional layer and the tests all derive from it, so adding a backend is one
:func:`register_backend` call (plus its kernels). ``backend=`` or the environment variable
``PNI_FAST_BACKEND`` overrides the automatic choice; an override that cannot run on that
device is an error rather than a silent substitution. The ``"torch"`` backend (pure PyTorch)
runs everywhere and is the fallback, announced once per device type.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _ext

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Backend",
    "REGISTRY",
    "register_backend",
    "available_backends",
    "resolve_backend",
    "resolve_cached",
    "info",
]

ENV_VAR = "PNI_FAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One implementation of the op contract.

    Attributes:
        name: what users pass as ``backend=``.
        device_types: device types whose tensors it takes.
        priority: higher wins the automatic choice; 0 = never chosen automatically (only on request
            or as the fallback).
        unavailable: ``device_type -> None`` when it can run there, else the reason it cannot.
        noise, perturb, alpha_grad: names of its ``torch.ops.pni_fast`` ops.
        perturb_multi, alpha_grad_multi: its list ops, or None (the functional layer then loops).
        module: the backend's module under :mod:`pni_fast.backends`, imported before its first call: it
            registers the ops (or, for the compiled library's ops, their fake kernels).
        cpp: the ops are schemas of the compiled library (shared by the cpu and cuda backends).
    """

    name: str
    device_types: tuple[str, ...]
    priority: int
    unavailable: Callable[[str], Optional[str]]
    noise: str
    perturb: str
    alpha_grad: str
    perturb_multi: Optional[str] = None
    alpha_grad_multi: Optional[str] = None
    module: Optional[str] = None
    cpp: bool = False

    def why_unavailable(self, device_type: str) -> Optional[str]:
        """None when this backend can run on ``device_type`` tensors, else the reason it cannot."""
        if device_type not in self.device_types:
            return f"backend {self.name!r} runs on {'/'.join(self.device_types)} tensors, got a {device_type} tensor"
        return self.unavailable(device_type)


REGISTRY: dict[str, Backend] = {}
_resolved: dict[tuple, str] = {}  # resolve_cached's memo; cleared when the registry changes


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend; dispatch and ``info()`` pick it up from here."""
    REGISTRY[backend.name] = backend
    _resolved.clear()
    return backend


# ---------------------------------------------------------------------------
# The built-in backends
# ---------------------------------------------------------------------------


def _cpp_unavailable(device_type: str) -> Optional[str]:
    if not _ext.load():
        return f"the C++ extension is not loaded ({_ext.status_message()})"
    if device_type == "cuda" and not _ext.has_cuda():
        return "the C++ extension was built without CUDA kernels"
    return None


def _triton_unavailable(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


_CPP_OPS = dict(
    module="pni_fast.backends.cpp",
    noise="noise",
    perturb="perturb",
    alpha_grad="perturb_alpha_grad",
    perturb_multi="perturb_multi",
    alpha_grad_multi="perturb_alpha_grad_multi",
    cpp=True,
)
register_backend(Backend("cpu", ("cpu",), 30, _cpp_unavailable, **_CPP_OPS))
register_backend(Backend("cuda", ("cuda",), 30, _cpp_unavailable, **_CPP_OPS))
register_backend(
    Backend(
        "triton",
        ("cuda", "cpu"),
        # automatic on CUDA when the CUDA kernels are missing; on CPU (interpreter) only on request
        20,
        _triton_unavailable,
        noise="noise_triton",
        perturb="perturb_triton",
        alpha_grad="perturb_alpha_grad_triton",
        perturb_multi="perturb_multi_triton",
        alpha_grad_multi="perturb_alpha_grad_multi_triton",
        module="pni_fast.backends.triton",
    )
)
register_backend(
    Backend(
        "torch",
        ("cpu", "cuda", "mps", "xpu", "meta"),
        0,
        lambda device_type: None,
        noise="noise_torch",
        perturb="perturb_torch",
        alpha_grad="perturb_alpha_grad_torch",
        module="pni_fast.backends.pure_torch",
    )
)
FALLBACK = "torch"
BACKENDS = tuple(REGISTRY)


def _automatic(device_type: str) -> list[Backend]:
    """Backends the automatic choice may take for ``device_type``, best first (the interpreter never)."""
    cands = [b for b in REGISTRY.values() if b.priority > 0 and device_type in b.device_types]
    if device_type == "cpu":
        cands = [b for b in cands if b.name != "triton"]  # the interpreter is a test tool, not a fast path
    return sorted(cands, key=lambda b: -b.priority)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device``, best first."""
    device_type = torch.device(device).type
    order = sorted(REGISTRY.values(), key=lambda b: -b.priority)
    return [b.name for b in order if b.why_unavailable(device_type) is None]


_warned_fallback: set[str] = set()


def _auto(device_type: str, warn: bool = True) -> str:
    preferred = _automatic(device_type)
    for b in preferred:
        if b.why_unavailable(device_type) is None:
            return b.name
    if warn and device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        reasons = "; ".join(f"{b.name}: {b.why_unavailable(device_type)}" for b in preferred) or "none registered"
        warnings.warn(
            f"pni_fast: no fused kernel for {device_type} tensors ({reasons}); "
            "using the pure-PyTorch backend (same noise, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
    return FALLBACK


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
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, REGISTRY))} or None, got {name!r}")
    reason = REGISTRY[name].why_unavailable(device_type)
    if reason is not None:
        raise RuntimeError(f"{source}={name!r} cannot run here: {reason}")
    return name


def resolve_cached(name: Optional[str], device_type: str) -> str:
    """:func:`resolve_backend` memoized on what it reads (name, device type, ``$PNI_FAST_BACKEND``; a
    result of "triton" is not memoized, it also reads ``$TRITON_INTERPRET``): every op call resolves its
    backend, and the full check costs ~2 us."""
    if name is not None and not isinstance(name, str):
        return resolve_backend(name, device_type)  # raises the clear error
    key = (name, device_type, os.environ.get(ENV_VAR))
    hit = _resolved.get(key)
    if hit is None:
        hit = resolve_backend(name, device_type)
        if hit != "triton":  # triton's availability on CPU also depends on $TRITON_INTERPRET: not memoized
            _resolved[key] = hit
    return hit


def info() -> str:
    """A human-readable report of the installed backends and why any is missing."""
    lines = [
        f"pni_fast backends (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})",
        f"  C++ extension: {_ext.status_message()}",
    ]
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dt in device_types:
        for b in REGISTRY.values():
            if dt not in b.device_types or (b.cpp and b.name != dt):
                continue
            reason = b.why_unavailable(dt)
            lines.append(f"  {dt:4s} {b.name:6s} {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append(f"  {dt:4s} automatic choice -> {_auto(dt, warn=False)}")
    if os.environ.get(ENV_VAR):
        lines.append(f"  {ENV_VAR}={os.environ[ENV_VAR]}")
    return "\n".join(lines)
