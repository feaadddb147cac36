"""The tests' one notion of a backend: names, availability and parametrization, all from pni_fast's
registry (``registry.REGISTRY``), and every backend's kernels behind one interface.

* :func:`backend_params`: pytest params of the backends that serve a device's tensors (a test of the
  public API, ``backend=name``), best first; one that cannot run here is skipped with the registry's
  reason (``triton: triton runs on CPU tensors only under TRITON_INTERPRET=1``). ``exclude`` leaves
  backends out on purpose (:data:`TRITON_ELSEWHERE`), ``fake=True`` adds each backend's fake-kernel
  variant (FakeTensorMode): params ``(name, fake)``.
* the ``kernel`` / ``cpp_kernel`` fixtures (tests/conftest.py, :func:`params` and :func:`get`): each
  backend's ops on its own device: "cpu" (C++), "torch" (pure PyTorch) and, without a GPU, "triton"
  (under the interpreter) on CPU tensors; "cuda" and, with a GPU, "triton" on CUDA tensors. These skip
  at set-up (never at collection: collecting a kernel test loads no extension).

Both say why a backend cannot run through :func:`skip_reason`. ``PNI_TEST_BACKENDS=cpu,torch``
restricts both parametrizations (scripts/sanitize.sh and scripts/gpu_check.sh use it).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import pni_fast
from pni_fast.ops import registry

from oracle import Bounds

ON_GPU = torch.cuda.is_available()
ALL = tuple(registry.REGISTRY)  # the built-in backends, in registration order
CPP = tuple(n for n in ALL if registry.REGISTRY[n].cpp)  # the compiled library's: also rng_words / rng_uniform
# The public-API tests leave triton out with this: tests/test_triton.py covers its public API (the
# interpreter makes every call slow); the kernel tests (the ``kernel`` fixture) keep it.
TRITON_ELSEWHERE = ("triton",)
_ONLY = [n for n in os.environ.get("PNI_TEST_BACKENDS", "").split(",") if n]


# (test function, backend) pairs among the slowest tests of the suite (marked ``slow`` at collection by
# conftest.py; measured with --durations): the interpreter's numpy execution of bigger launches
SLOW = {
    ("test_opcheck", "triton"),
    ("test_unaligned_views", "triton"),
    ("test_multi_equals_single", "triton"),
}


def _chosen(names) -> list[str]:
    return [n for n in names if not _ONLY or n in _ONLY]


def skip_reason(name: str, device_type: str) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device_type`` tensors here ("name: reason"), None when it can."""
    if device_type == "cuda" and not ON_GPU:
        return f"{name}: no CUDA device on this machine"
    reason = registry.REGISTRY[name].why_unavailable(device_type)
    return None if reason is None else f"{name}: {reason}"


def _serving(device_type: str, exclude) -> list[str]:
    """The built-in backends that take ``device_type`` tensors, best first (the registry's priority)."""
    entries = sorted(registry.REGISTRY.values(), key=lambda b: -b.priority)
    names = _chosen(b.name for b in entries if device_type in b.device_types)
    return [n for n in names if n in ALL and n not in exclude]


def backend_params(device_type: str = "cpu", exclude=(), fake: bool = False) -> list:
    """pytest params of the backends that serve ``device_type`` tensors, best first (the registry's
    priority), each skipped with its reason when it cannot run here; ``exclude``: names left out on
    purpose. ``fake``: params ``(name, fake)``, ids ``name`` and ``name-fake`` (its fake kernels)."""
    out = []
    for name in _serving(device_type, exclude):
        reason = skip_reason(name, device_type)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if device_type == "cuda":
            marks.append(pytest.mark.cuda)
        if fake:
            out += [pytest.param(name, f, marks=marks, id=name + "-fake" * f) for f in (False, True)]
        else:
            out.append(pytest.param(name, marks=marks, id=name))
    return out


def runnable(device_type: str = "cpu", exclude=()) -> list[str]:
    """The names of :func:`backend_params` that can run here (a test that loops over backends)."""
    return [n for n in _serving(device_type, exclude) if skip_reason(n, device_type) is None]


def extend(param, *values, id: str, marks=()) -> object:
    """``param`` (one of :func:`backend_params`) with more values, its marks and these."""
    return pytest.param(*param.values, *values, marks=[*param.marks, *marks], id=f"{param.id}-{id}")


def params(names=ALL) -> list:
    """pytest params of the ``kernel`` fixtures (the cuda one carries the ``cuda`` marker); no availability
    check here: :func:`get` skips at set-up."""
    return [pytest.param(n, id=n, marks=[pytest.mark.cuda] if n == "cuda" else []) for n in _chosen(names)]


@dataclass(frozen=True)
class Kernel:
    """One backend's ops on its device. ``interpreted``: Triton's interpreter (numpy, slow, converts
    to bfloat16 by truncation); ``bounds``: the contract's bounds for this backend."""

    name: str
    device: str
    interpreted: bool
    entry: object  # its pni_fast.ops.registry.Backend

    def __str__(self) -> str:
        return self.name

    def _op(self, field: str):
        name = getattr(self.entry, field)
        return getattr(torch.ops.pni_fast, name) if name else None

    noise = property(lambda self: self._op("noise"))
    perturb = property(lambda self: self._op("perturb"))
    alpha_grad = property(lambda self: self._op("alpha_grad"))
    perturb_multi = property(lambda self: self._op("perturb_multi"))
    alpha_grad_multi = property(lambda self: self._op("alpha_grad_multi"))
    has_multi = property(lambda self: self.entry.perturb_multi is not None)
    bounds = property(lambda self: Bounds(bf16_truncates=self.interpreted))
    # ops built from the oracle's z element by element on the same inputs: results agree bit for bit
    # between list and single ops (the Triton list op reduces with another code path)
    multi_grad_bitwise = property(lambda self: self.name in CPP)

    def need_multi(self) -> None:
        if not self.has_multi:
            pytest.skip(f"backend {self.name!r} has no list ops (the functional layer loops over tensors)")


def device_of(name: str) -> str:
    return "cuda" if name == "cuda" or (name == "triton" and ON_GPU) else "cpu"


def get(name: str) -> Kernel:
    """The kernel of backend ``name`` on its device, or a skip that says why it cannot run here."""
    device = device_of(name)
    reason = skip_reason(name, device)
    if reason is not None:
        pytest.skip(reason)
    entry = registry.REGISTRY[name]
    if entry.module:
        importlib.import_module(entry.module)
    interpreted = name == "triton" and device == "cpu"
    if interpreted and not importlib.import_module("pni_fast.backends.triton.launch_config").INTERPRETED:
        pytest.skip("triton: it was imported before TRITON_INTERPRET=1 was set, its kernels cannot run on CPU tensors")
    pni_fast.randn((1,), seed=0, device=device, backend=name)  # registers fake kernels and autograd
    return Kernel(name, device, interpreted, entry)
