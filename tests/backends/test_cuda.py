"""GPU tests: the CUDA C++ kernels and the Triton kernels on a real device, beyond the op contract
every backend meets (tests/test_kernels_*.py, parametrized by backend, include "cuda" and, on a GPU,
Triton on CUDA tensors): agreement across backends, memory layouts, several devices, big tensors,
fp16 gradients beyond fp16's range. The public API against the paper-faithful reference, autocast
and the list API: tests/test_cuda_api.py. Graphs, torch.compile and RNG state tensors:
tests/ops/test_cuda_graphs.py. Set-up and the dry run without a GPU: tests/support/cuda_support.py.
``scripts/gpu_check.sh`` runs these files on a GPU.

Tolerances follow the contract (design.md section 3, docs/ops.md; the bounds of tests/support/oracle.py),
never a measured value. Bitwise equality is asserted only where the same kernel sees the same values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pni_fast
from pni_fast import _ext

import oracle
from cuda_support import (  # noqa: F401  (needs_device: autouse fixture)
    DEV,
    DRY_RUN,
    GPU_BACKENDS,
    OFFSET,
    SEED,
    api,
    check_grad,
    check_perturb,
    gpu_ops,
    grad_bound,
    has_cuda_ext,
    has_triton,
    inputs,
    needs_cuda_ext,
    needs_device,
    needs_triton,
    ops,
    out_bound,
    real_gpu,
    runs_on_cpu,
)
from oracle import SIGMA_REL, Z_TOL, assert_within, expected_out, flat64, grad_terms

pytestmark = [pytest.mark.cuda]


def z64_(numel, seed=SEED, offset=OFFSET) -> torch.Tensor:
    return oracle.z64(numel, seed, offset)


# ---------------------------------------------------------------------------
# The helpers can fail (CPU backend; no GPU needed)
# ---------------------------------------------------------------------------


@runs_on_cpu
def test_oracle_z_at_matches_full_oracle():
    idx = np.array([0, 1, 2, 3, 4, 7, 998, 999, 1001])
    full = z64_(1002, 77, 2**32 - 1)
    assert torch.equal(oracle.normal_at(77, 2**32 - 1, idx), full[idx])


@runs_on_cpu
def test_bounds_accept_cpu_kernels_and_reject_defects():
    """The CPU backend obeys the same contract: it passes, and shifted or perturbed results fail."""
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(5))
    alpha = torch.full((16, 1, 1, 1), 0.3, requires_grad=True)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    out = pni_fast.noisy_weight(w, alpha, seed=SEED, offset=OFFSET)
    out.backward(g)
    sigma = pni_fast.weight_sigma(w)
    z = z64_(w.numel())
    check_perturb(out, w, alpha, sigma, 72, z)
    check_grad(alpha.grad, g, alpha, sigma, 72, z)
    for wrong_z in (z64_(w.numel(), SEED, OFFSET + 1), z64_(w.numel(), SEED + 1, OFFSET)):
        with pytest.raises(AssertionError, match="out of bounds"):
            check_perturb(out, w, alpha, sigma, 72, wrong_z)
        with pytest.raises(AssertionError, match="out of bounds"):
            check_grad(alpha.grad, g, alpha, sigma, 72, wrong_z)
    bumped = out.detach().clone()
    bumped.view(-1)[100] += 2e-5 * 0.3 * float(sigma)  # beyond |alpha sigma| * Z_TOL + rounding
    with pytest.raises(AssertionError, match="1 of 1152 elements"):
        check_perturb(bumped, w, alpha, sigma, 72, z)
    lost = alpha.grad.clone()
    lost[3] -= float(sigma) * 0.02 * abs(float(g.reshape(16, -1)[3, 0]) * float(z.reshape(16, -1)[3, 0]))
    with pytest.raises(AssertionError, match="1 of 16 elements"):
        check_grad(lost, g, alpha, sigma, 72, z)
    with pytest.raises(AssertionError, match="out of bounds"):
        assert_within(
            torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), "nan"
        )


# ---------------------------------------------------------------------------
# RNG agreement across backends
# ---------------------------------------------------------------------------


def test_noise_agrees_across_backends():
    """CUDA, Triton, CPU and pure-PyTorch z for one (seed, offset) vs the oracle, within 2e-6."""
    n = 10_007
    expected = oracle.normal(SEED, OFFSET, n)
    got = {
        "torch-cpu": pni_fast.randn((n,), seed=SEED, offset=OFFSET, device="cpu", backend="torch"),
        "torch-dev": pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend="torch"),
    }
    if _ext.load():
        got["cpu"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device="cpu", backend="cpu")
    if has_cuda_ext():
        got["cuda"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend=api("cuda"))
    if has_triton():
        got["triton"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend="triton")
    for name, z in got.items():
        assert z.dtype == torch.float32 and z.shape == (n,), name
        err = np.abs(z.cpu().numpy().astype(np.float64) - expected).max()
        assert err <= Z_TOL, f"{name}: max |z - oracle| = {err:.3g}"


@needs_cuda_ext
def test_cuda_noise_large_tensor():
    n = (1 << 22) + 3
    z = ops.noise(torch.empty(n, device=DEV), 11, 5).cpu().numpy()
    idx = np.r_[0:1000, n - 1000 : n]
    assert np.abs(z[idx] - oracle.normal(11, 5, n)[idx]).max() <= Z_TOL
    # 4M samples: the standard errors of mean and variance are 5e-4 and 7e-4
    assert abs(z.mean()) < 3e-3 and abs(z.var() - 1) < 4e-3


@needs_cuda_ext
@needs_triton
def test_cuda_matches_triton():
    """Both backends within the contract of each other (each z within Z_TOL of the oracle)."""
    shape, n_alpha, inner = (16, 8, 3, 3), 16, 72  # conv-channelwise
    v, g, alpha, sigma = inputs(shape, n_alpha, torch.float32)
    cu, tr = gpu_ops("cuda"), gpu_ops("triton")
    out_cu, out_tr = cu[1](v, alpha, sigma, 4, 9, inner), tr[1](v, alpha, sigma, 4, 9, inner)
    z_tr = flat64(tr[0](v, 4, 9))
    exp, a = expected_out(v, alpha, sigma, inner, z_tr)
    assert_within(out_cu, exp, out_bound(flat64(v), a, float(sigma), z_tr, v.dtype, 2 * Z_TOL), "cuda vs triton z")
    assert_within(out_tr, exp, out_bound(flat64(v), a, float(sigma), z_tr, v.dtype, 0.0), "triton vs own z")
    exp, abs_gz, abs_g = grad_terms(g, alpha, sigma, inner, z_tr)
    bound = grad_bound(exp, abs_gz, abs_g, g.dtype, alpha.dtype, 2 * Z_TOL)
    assert_within(cu[2](g, alpha, sigma, 4, 9, inner), exp, bound, "cuda alpha grad vs triton z")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_contiguous_and_channels_last(backend):
    """Elements are taken in logical (contiguous) order whatever the memory layout."""
    b = api(backend)
    gen = torch.Generator().manual_seed(4)
    cases = [  # (function, tensor, alpha)
        (
            pni_fast.noisy_weight,
            torch.randn(16, 8, 3, 3, generator=gen).to(memory_format=torch.channels_last),
            torch.full((16, 1, 1, 1), 0.25),
        ),
        (pni_fast.noisy_weight, torch.randn(40, 30, generator=gen).t(), torch.linspace(0.1, 0.4, 30).reshape(30, 1)),
        (
            pni_fast.inject_noise,
            torch.randn(4, 6, 7, 7, generator=gen).to(memory_format=torch.channels_last),
            torch.linspace(0.1, 0.6, 6),
        ),
        (pni_fast.inject_noise, torch.randn(6, 9, generator=gen)[:, ::2], torch.full((1,), 0.3)),
    ]
    for fn, t, a in cases:
        t = t.to(DEV)  # .to keeps the strides (channels_last, transposed, sliced)
        assert not t.is_contiguous()
        g = torch.randn(t.shape, generator=gen).to(DEV)
        g = g.to(memory_format=torch.channels_last) if t.dim() == 4 else g.t().contiguous().t()
        grads = []
        for x, gx in ((t, g), (t.contiguous(), g.contiguous())):
            leaf = a.to(DEV).requires_grad_()
            out = fn(x, leaf, seed=SEED, offset=3, backend=b)
            assert out.shape == t.shape
            out.backward(gx)
            grads.append((out.detach().contiguous(), leaf.grad))
        assert torch.equal(grads[0][0], grads[1][0]), fn.__name__
        assert torch.equal(grads[0][1], grads[1][1]), fn.__name__


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: results there, equal to the same call on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs a second GPU (found {torch.cuda.device_count()})")
    w0 = torch.randn(64, 32, 3, 3, device="cuda:0")
    a0 = torch.full((64, 1, 1, 1), 0.25, device="cuda:0")
    g0 = torch.randn(w0.shape, device="cuda:0")
    results = []
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            a = a0.to(dev).requires_grad_()
            out = pni_fast.noisy_weight(w0.to(dev), a, seed=SEED, offset=5, backend=backend)
            out.backward(g0.to(dev))
            outs = pni_fast.noisy_weights(
                [w0.to(dev), w0[:3].to(dev)], [a0.to(dev), a0[:1, 0, 0].to(dev)], seed=SEED, backend=backend
            )
            assert out.device == a.grad.device == outs[1].device == torch.device(dev)
            results.append([out.detach().cpu(), a.grad.cpu()] + [o.cpu() for o in outs])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def _check_big_tensor(noise, perturb, alpha_grad, n: int, chunk: int, device) -> None:
    """perturb and alpha grad of a bf16 tensor of n elements, checked at sampled elements (oracle z)
    and, for the gradient, against float64 sums of the backend's own z computed chunk by chunk."""
    v = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_(-2, 2)
    sigma = torch.tensor(0.5, device=device)
    mid = min(2**31, n // 2)  # around the int32 limit of a tensor beyond it
    rng = np.random.default_rng(0)
    idx = np.unique(np.r_[0:1024, mid - 1024 : mid + 2, n - 1024 : n, rng.integers(0, n, 1000)])
    idx_dev = torch.from_numpy(idx).to(device)
    z_at = oracle.normal_at(SEED, OFFSET, idx)
    assert chunk % 4 == 0  # each chunk's noise starts at counter OFFSET + start / 4
    for n_alpha, inner in [(1, 1), (2, n // 2)]:
        alpha = torch.tensor([0.3, 0.7][:n_alpha], dtype=torch.bfloat16, device=device)
        out = perturb(v, alpha, sigma, SEED, OFFSET, inner)
        a = flat64(alpha)[torch.from_numpy((idx // inner) % n_alpha)]
        v_at = flat64(v[idx_dev])
        bound = out_bound(v_at, a, 0.5, z_at, torch.bfloat16, Z_TOL)
        assert_within(out[idx_dev], v_at + a * 0.5 * z_at, bound, f"out at sampled elements, {n_alpha} alpha")
        del out
        grad = alpha_grad(v, alpha, sigma, SEED, OFFSET, inner)  # the gradient g = v
        exp = torch.zeros(n_alpha, dtype=torch.float64, device=device)
        abs_gz = torch.zeros_like(exp)
        for start in range(0, n, chunk):
            part = v[start : start + chunk]
            z = noise(part, SEED, OFFSET + start // 4)
            here = (idx >= start) & (idx < start + part.numel())
            if here.any():
                local = torch.from_numpy(idx[here] - start).to(device)
                assert (flat64(z[local]) - z_at[torch.from_numpy(here)]).abs().max() <= Z_TOL, start
            gz = part.double() * z.double()
            k = (torch.arange(start, start + part.numel(), device=device) // inner) % n_alpha
            exp.index_add_(0, k, gz)
            abs_gz.index_add_(0, k, gz.abs())
            del z, gz, k
        exp, abs_gz = exp.cpu() * 0.5, abs_gz.cpu() * 0.5
        bound = grad_bound(exp, abs_gz, abs_gz, torch.bfloat16, torch.bfloat16, 0.0)
        assert_within(grad, exp, bound, f"alpha grad, {n_alpha} alpha")


@runs_on_cpu
def test_big_tensor_check_on_cpu_backend():
    """The check of test_more_than_2_31_elements, at 2^20 + 2 elements on the CPU backend."""
    backend = "" if _ext.load() else "_torch"
    names = (f"noise{backend}", f"perturb{backend}", f"perturb_alpha_grad{backend}")
    if backend:
        pni_fast.randn((1,), seed=0, device="cpu", backend="torch")  # registers the pure-PyTorch ops
    _check_big_tensor(*[getattr(ops, name) for name in names], n=2**20 + 2, chunk=2**17, device="cpu")


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    """A bf16 tensor of 2^31 + 2 elements: 64-bit indexing in the forward and the alpha gradient."""
    noise, perturb, alpha_grad, _, _ = gpu_ops(backend)
    n = 2**31 + 2
    free, _ = torch.cuda.mem_get_info()
    need = 2 * 2 * n + 7 * 2**30  # v and out (bf16), the check's float64 chunks of 2^27
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    _check_big_tensor(noise, perturb, alpha_grad, n, chunk=2**27, device=DEV)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["layerwise", "channelwise"])
def test_fp16_alpha_grad_beyond_fp16_range(backend, mode):
    """8M fp16 elements, float32 alpha: the exact gradient exceeds 65504 and must stay finite and right."""
    if DRY_RUN and backend == "triton":
        pytest.skip("8M elements are too slow for the Triton interpreter")
    shape = (4, 2**21)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).half().to(DEV)
    z = pni_fast.randn(shape, seed=SEED, offset=0, device=DEV, backend=api(backend))  # the backend's own z
    g = z.half()  # correlated with the noise: sum g z ~ numel, every partial sum positive
    alpha = torch.full((1,) if mode == "layerwise" else (4, 1), 0.25, device=DEV, requires_grad=True)
    out = pni_fast.noisy_weight(w, alpha, seed=SEED, offset=0, backend=api(backend))
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    out.backward(g)
    grad = alpha.grad
    assert grad.dtype == torch.float32 and bool(torch.isfinite(grad).all()), grad
    sigma = float(pni_fast.weight_sigma(w))
    gz = (g.double() * z.double()).reshape(alpha.numel(), -1).sum(dim=1).cpu() * sigma
    assert gz.abs().min() > 65504, gz  # the case really leaves fp16's range
    bound = grad_bound(gz, gz.abs(), gz.abs(), torch.float16, torch.float32, 0.0, SIGMA_REL[torch.float32])
    assert_within(grad, gz, bound, "alpha grad beyond the fp16 range")
