"""PNI_FAST_CUDA_SIGMA=1 (pni_fast/ops/sigma.py): sigma on CUDA from the CUDA sigma kernels, CPU definition.

Off (the default) CUDA keeps float32 ``torch.std``; on, sigma on CUDA is the CPU definition (float64
two-pass, rounded once), computed by the compiled ``sigma`` / ``sigma_multi`` CUDA kernels when the
library has them, else by the same tensor ops as on CPU. On a CPU machine the routing is checked
with the library's kernels stubbed, and that CPU sigma does not change with the switch; the values
on a GPU are checked by the tests marked ``cuda`` (scripts/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch

from pni_fast import _ext
from pni_fast.ops import sigma

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def switch(monkeypatch):
    def set_to(on: bool, kernels: bool = True):
        if on:
            monkeypatch.setenv(sigma.CUDA_SIGMA_ENV, "1")
        else:
            monkeypatch.delenv(sigma.CUDA_SIGMA_ENV, raising=False)
        monkeypatch.setattr(sigma, "_cuda_sigma_kernels", lambda: kernels)

    return set_to


def test_off_by_default_cuda_keeps_torch_std(switch):
    switch(False)
    assert not sigma.cuda_sigma_switch()
    assert not sigma._f64_definition("cuda") and sigma._f64_definition("cpu")
    assert not sigma._fused_sigma("cuda") and not sigma._fused_sigma("cuda", "sigma_multi")


def test_on_routes_cuda_to_the_kernels_or_to_the_same_definition(switch):
    switch(True)
    assert sigma.cuda_sigma_switch() and sigma._f64_definition("cuda")
    assert sigma._fused_sigma("cuda") and sigma._fused_sigma("cuda", "sigma_multi")
    switch(True, kernels=False)  # no CUDA build: the tensor ops of the same definition
    assert not sigma._fused_sigma("cuda") and sigma._f64_definition("cuda")
    assert not sigma._fused_sigma("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_sigma_does_not_change_with_the_switch(switch, dtype):
    gen = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=gen).to(dtype) for n in (1, 2, 7, 432, 5000)]
    switch(False)
    before = [sigma.weight_sigma(t) for t in ts] + sigma.weight_sigmas(ts)
    switch(True)
    after = [sigma.weight_sigma(t) for t in ts] + sigma.weight_sigmas(ts)
    for b, a in zip(before, after):
        assert a.dtype == b.dtype and torch.equal(a, b)


needs_cuda_sigma = pytest.mark.skipif(
    not (ON_GPU and _ext.has_op("sigma", "cuda") and _ext.has_op("sigma_multi", "cuda")),
    reason="needs a CUDA device and the CUDA build of pni_fast (csrc/cuda/sigma_cuda.cu)",
)


@pytest.mark.cuda
@needs_cuda_sigma
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_on_gpu_the_switch_uses_the_kernels_with_the_cpu_definition(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(5)
    ts = [torch.randn(n, generator=gen).to(dtype) for n in (2, 432, 4608, 200_000)]
    dev = [t.cuda() for t in ts]
    monkeypatch.delenv(sigma.CUDA_SIGMA_ENV, raising=False)
    for t in dev:
        assert torch.equal(sigma.weight_sigma(t), t.float().std())  # off: torch's float32 std
    monkeypatch.setenv(sigma.CUDA_SIGMA_ENV, "1")
    single = [sigma.weight_sigma(t) for t in dev]
    multi = sigma.weight_sigmas(dev)
    for t, s, m, c in zip(dev, single, multi, ts):
        assert s.device == t.device and s.dtype == torch.float32
        assert torch.equal(s, torch.ops.pni_fast.sigma(t)) and torch.equal(m, s)
        cpu = sigma.weight_sigma(c)
        assert torch.allclose(s.cpu(), cpu, rtol=2**-23, atol=0), (s, cpu)  # same definition, summation order aside
        assert torch.allclose(sigma.sigma_torch(t).cpu(), cpu, rtol=2**-23, atol=0)  # the fallback's definition
