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

import numpy as np
import pytest
import torch

import pni_fast
from pni_fast.ops import registry

import oracle
from oracle import Z_TOL, Bounds, flat64

ON_GPU = torch.cuda.is_available()
ALL = tuple(registry.REGISTRY)  # the built-in backends, in registration order
CPP = tuple(n for n in ALL if registry.REGISTRY[n].cpp)  # the compiled library's: also rng_words / rng_uniform
# The public-API tests leave triton out with this: tests/backends/test_triton.py covers its public API (the
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


# ---------------------------------------------------------------------------
# Checks every kernel test shares: a backend's noise and results against the numpy oracle
# ---------------------------------------------------------------------------

SEED = 0x0DDB_A11_5EED  # > 2^32: exercises the high key word
OFFSET = 2**32 - 100  # counters cross the 32-bit boundary of c0 / c1


def check_noise(kernel, z: torch.Tensor, seed: int, offset: int) -> None:
    """z (float32) within Z_TOL of the oracle; bit-equal to it under the interpreter."""
    assert z.dtype == torch.float32
    got, ref = z.reshape(-1).cpu().numpy(), oracle.normal(seed, offset, z.numel())
    np.testing.assert_allclose(got, ref, rtol=0, atol=Z_TOL)
    if kernel.interpreted:
        np.testing.assert_array_equal(got, ref)


def own_and_oracle_z(kernel, like, seed=SEED, offset=OFFSET, z=None):
    """(oracle z, the backend's own z) in float64; the own z (``z`` if given, else the noise op's)
    is checked against the oracle first."""
    if z is None:
        z = kernel.noise(like, seed, offset)
    check_noise(kernel, z, seed, offset)
    return oracle.z64(like.numel(), seed, offset), flat64(z)


def check(kernel, out, grad, v, g, alpha, sigma, inner, seed=SEED, offset=OFFSET, what=""):
    """perturb's out and the alpha grad (either may be None) against float64 math on both z."""
    z_oracle, z_own = own_and_oracle_z(kernel, v, seed, offset)
    if out is not None:
        kernel.bounds.check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own, what=f"{what}out")
    if grad is not None:
        kernel.bounds.check_grad(grad, g, alpha, sigma, inner, z_oracle, z_own, what=f"{what}alpha grad")


def model_like_lists(count: int, device, base: int = 0, small: bool = False):
    """A list like a CIFAR ResNet's noisy weights: mixed modes, one fp16 tensor, one empty tensor
    (``small``: a quarter of the channels, for the Triton interpreter)."""
    specs = [
        ((16, 3, 3, 3), "channelwise"),
        ((16, 16, 3, 3), "layerwise"),
        ((32, 16, 3, 3), "elementwise"),
        ((64, 32, 3, 3), "channelwise"),
        ((10, 64), "layerwise"),
    ]
    if small:
        specs = [((max(s[0] // 4, 2),) + s[1:], mode) for s, mode in specs]
    vs, gs, alphas, sigmas, offsets, inners = [], [], [], [], [], []
    offset = base
    gen = torch.Generator().manual_seed(2)
    for i in range(count):
        shape, mode = specs[i % len(specs)]
        dtype = torch.float16 if i == 3 else torch.float32
        v = torch.randn(shape, generator=gen).to(dtype).to(device)
        n_alpha, inner = {
            "layerwise": (1, 1),
            "channelwise": (shape[0], v.numel() // shape[0]),
            "elementwise": (v.numel(), 1),
        }[mode]
        vs.append(v)
        gs.append(torch.randn(shape, generator=gen).to(dtype).to(device))
        alphas.append((torch.rand(n_alpha, generator=gen) + 0.1).to(dtype).to(device))
        sigmas.append(v.float().std())
        offsets.append(offset)
        inners.append(inner)
        offset += (v.numel() + 3) // 4
    vs.append(torch.empty(0, device=device)), gs.append(torch.empty(0, device=device))
    alphas.append(torch.ones(1, device=device)), sigmas.append(torch.tensor(0.0, device=device))
    offsets.append(offset), inners.append(1)
    return vs, gs, alphas, sigmas, offsets, inners
