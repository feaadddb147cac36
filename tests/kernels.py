"""Every backend's kernels behind one interface, so a kernel test is one body for all backends.

The backends and their op names come from pni_fast's registry (pni_fast.ops.registry.REGISTRY). Each
runs on its own device: "cpu" (C++), "torch" (pure PyTorch) and, without a GPU, "triton" (under
the interpreter) on CPU tensors; "cuda" and, with a GPU, "triton" on CUDA tensors. A backend that
cannot run here skips with the registry's reason, at set-up (never at collection).
``PNI_TEST_BACKENDS=cpu,torch`` restricts the parametrization (scripts/sanitize.sh uses it).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import pytest
import torch

from oracle import Bounds

ON_GPU = torch.cuda.is_available()
ALL = ("cpu", "torch", "triton", "cuda")
CPP = ("cpu", "cuda")  # the backends with the rng_words / rng_uniform ops of the compiled library
_ONLY = [n for n in os.environ.get("PNI_TEST_BACKENDS", "").split(",") if n]


# (test function, backend) pairs among the slowest tests of the suite (marked ``slow`` at collection by
# conftest.py; measured with --durations): the interpreter's numpy execution of bigger launches
SLOW = {
    ("test_opcheck", "triton"),
    ("test_unaligned_views", "triton"),
    ("test_multi_equals_single", "triton"),
}


def params(names=ALL) -> list:
    """pytest params for ``names`` (the cuda one carries the ``cuda`` marker)."""
    chosen = [n for n in names if not _ONLY or n in _ONLY]
    return [pytest.param(n, marks=pytest.mark.cuda, id=n) if n == "cuda" else pytest.param(n, id=n) for n in chosen]


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
    if device == "cuda" and not ON_GPU:
        pytest.skip("no CUDA device on this machine")
    import pni_fast
    from pni_fast.ops.registry import REGISTRY

    entry = REGISTRY[name]
    reason = entry.why_unavailable(device)
    if reason is not None:
        pytest.skip(f"backend {name!r} cannot run on {device}: {reason}")
    if entry.module:
        importlib.import_module(entry.module)
    interpreted = name == "triton" and device == "cpu"
    if interpreted and not importlib.import_module("pni_fast.backends.triton.launch_config").INTERPRETED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on CPU tensors")
    pni_fast.randn((1,), seed=0, device=device, backend=name)  # registers fake kernels and autograd
    return Kernel(name, device, interpreted, entry)
