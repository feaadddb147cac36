"""Shared set-up of the GPU test files (tests/backends/test_cuda.py, tests/test_cuda_api.py,
tests/ops/test_cuda_graphs.py).

Tests there skip with "no CUDA device" on machines without a GPU, unless marked ``runs_on_cpu``
(checks of the helpers on the CPU backend). ``PNI_GPU_TESTS_ON_CPU=1`` on a machine without a
GPU runs the tests' logic on CPU tensors (C++ CPU kernels for "cuda", the Triton interpreter for
"triton"), a dry run; what needs a real device (graphs, streams, big memory) still skips.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import pni_fast
from pni_fast import _ext

from oracle import Bounds

ON_GPU = torch.cuda.is_available()
DRY_RUN = not ON_GPU and os.environ.get("PNI_GPU_TESTS_ON_CPU") == "1"
DEV = "cuda" if ON_GPU else "cpu"
ops = torch.ops.pni_fast
SEED = 0x0DDB_A11_5EED  # > 2^32
OFFSET = 2**32 - 100  # counters cross the 32-bit boundary of c0/c1

BOUNDS = Bounds(bf16_truncates=DRY_RUN)  # the Triton interpreter converts to bf16 by truncation
out_bound, grad_bound, check_perturb, check_grad = (
    BOUNDS.out_bound,
    BOUNDS.grad_bound,
    BOUNDS.check_perturb,
    BOUNDS.check_grad,
)


def runs_on_cpu(fn):
    """Mark a test that needs no GPU (it checks the helpers on the CPU backend)."""
    fn.runs_on_cpu = True
    return fn


@pytest.fixture(autouse=True)
def needs_device(request):
    """Import into a GPU test module: every test there skips without a device (see runs_on_cpu)."""
    if not (ON_GPU or DRY_RUN or getattr(request.function, "runs_on_cpu", False)):
        pytest.skip("no CUDA device")


def has_cuda_ext() -> bool:
    if ON_GPU:
        return _ext.load() and _ext.has_cuda()
    return DRY_RUN and _ext.load()  # dry run: the C++ CPU kernels stand in


def has_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"


needs_cuda_ext = pytest.mark.skipif(
    (ON_GPU or DRY_RUN) and not has_cuda_ext(),
    reason="pni_fast was built without CUDA kernels" if ON_GPU else "the C++ extension is not loaded",
)
needs_triton = pytest.mark.skipif((ON_GPU or DRY_RUN) and not has_triton(), reason="triton is not installed")
real_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a real CUDA device (streams, graphs or device memory)")
needs_rng_state = pytest.mark.skipif(
    not hasattr(pni_fast, "make_rng_state"),
    reason="pni_fast.make_rng_state is missing (op contract v2 not implemented)",
)

GPU_BACKENDS = [
    pytest.param("cuda", marks=needs_cuda_ext),
    pytest.param("triton", marks=needs_triton),
]


def gpu_ops(backend: str):
    """(noise, perturb, alpha grad, multi, alpha grad multi) of a GPU backend, from pni_fast's registry."""
    from pni_fast.ops.registry import REGISTRY

    entry = REGISTRY[backend]
    if entry.module:
        importlib.import_module(entry.module)  # registers the *_triton ops
    names = (entry.noise, entry.perturb, entry.alpha_grad, entry.perturb_multi, entry.alpha_grad_multi)
    return [getattr(ops, name) for name in names]


def api(backend: str) -> str:
    """The ``backend=`` name for the public API (dry run: the CPU kernels stand in for CUDA)."""
    return "cpu" if backend == "cuda" and not ON_GPU else backend


def inputs(shape, n_alpha, dtype, alpha_dtype=None, seed=0):
    """(v, g, flat alpha, sigma 0.75) on DEV."""
    from oracle import inputs as oracle_inputs

    return oracle_inputs(shape, (n_alpha,), dtype, alpha_dtype, seed, DEV)
