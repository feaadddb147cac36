"""Shared test setup: the Triton interpreter on CPU-only machines, tests/ helpers on sys.path, and
the fixtures ``kernel`` / ``cpp_kernel`` (one test body for every backend) and ``float_dtype``
(markers: pyproject.toml). The backends, their availability and parametrization come from one
place, tests/support/kernels.py (``kernels.backend_params`` for the public-API tests, these fixtures for the
kernel tests), which reads pni_fast's registry."""

import os
import sys

import pytest

# Triton kernels run on CPU tensors only through the interpreter, which must be chosen
# before triton is first imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))  # the helpers: oracle, kernels, ...

import kernels  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Mark the slow (test, backend) pairs of kernels.SLOW (a fixture param cannot carry a mark per test)."""
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("kernel")
        if backend and (getattr(item, "originalname", None), backend) in kernels.SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=kernels.params())
def kernel(request) -> "kernels.Kernel":
    """Each backend's ops on its device (cpu, torch, triton, cuda); skips with the reason one cannot run."""
    return kernels.get(request.param)


@pytest.fixture(params=kernels.params(kernels.CPP))
def cpp_kernel(request) -> "kernels.Kernel":
    """The compiled library's backends (cpu, cuda): they also have rng_words / rng_uniform."""
    return kernels.get(request.param)


@pytest.fixture(params=["float32", "float64", "float16", "bfloat16"])
def float_dtype(request) -> "torch.dtype":
    """Every floating dtype the ops take."""
    return getattr(torch, request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (several times faster than two on a busy machine):
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
