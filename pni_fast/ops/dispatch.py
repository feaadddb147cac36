"""Which backend runs a call, and what a backend's ops need before their first call.

Ops are prepared lazily, the first time a backend is chosen: its module under
:mod:`pni_fast.backends` is imported (so ``import pni_fast`` does not load Triton; the C++
backends' module registers the compiled ops' fake kernels) and every op gets autograd
(:mod:`pni_fast.ops.autograd`). The pure-PyTorch backend is prepared on import.
"""

from __future__ import annotations

import importlib
from typing import Optional

from . import registry
from .autograd import register_op_autograd
from .call import trace_constant
from .registry import REGISTRY

_registered: set[str] = set()


def _ensure_registered(backend: str) -> None:
    """Import a backend's module (its ops, or the C++ ops' fake kernels) and attach autograd, once per backend."""
    if backend in _registered:
        return
    be = REGISTRY[backend]
    if be.module is not None:
        importlib.import_module(be.module)
    register_op_autograd(be)
    _registered.add(backend)


_ensure_registered("torch")


@trace_constant
def backend_for(name: Optional[str], device_type: str) -> str:
    """Resolve and prepare the backend; a trace-time constant under torch.compile."""
    chosen = registry.resolve_cached(name, device_type)
    if chosen not in _registered:
        _ensure_registered(chosen)
    return chosen
