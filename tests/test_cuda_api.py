"""GPU tests of the public API: noisy_weight / inject_noise on the CUDA and Triton backends against the
paper-faithful reference, a PNI model under autocast with a GradScaler, and the list API
(noisy_weights) against one call per tensor. The kernels themselves: tests/backends/test_cuda.py; set-up and
the dry run without a GPU: tests/support/cuda_support.py. ``scripts/gpu_check.sh`` runs this file on a GPU.

Tolerances follow the contract (design.md section 3, docs/ops.md; the bounds of tests/support/oracle.py),
never a measured value. Bitwise equality is asserted only where the same kernel sees the same values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pni_fast
from pni_fast.reference import reference_noisy_weight

from cuda_support import (  # noqa: F401  (needs_device: autouse fixture)
    DEV,
    GPU_BACKENDS,
    SEED,
    api,
    check_grad,
    check_perturb,
    needs_device,
    real_gpu,
)
from kernels import model_like_lists
from oracle import DTYPES, SIGMA_REL, expected_out, flat64, grad_terms, z64

pytestmark = [pytest.mark.cuda]


# ---------------------------------------------------------------------------
# Public API: forward/backward vs the paper-faithful reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["layerwise", "channelwise", "elementwise"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float16-alpha32", "bfloat16-alpha32"])
def test_noisy_weight_vs_reference(backend, mode, dtype):
    vdtype, adtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, 16, 3, 3, generator=gen).to(vdtype)
    shape = {"layerwise": (1,), "channelwise": (32, 1, 1, 1), "elementwise": tuple(w0.shape)}[mode]
    inner = {"layerwise": 1, "channelwise": 144, "elementwise": 1}[mode]
    a0 = torch.full(shape, 0.25, dtype=adtype)
    g = torch.randn(w0.shape, generator=gen).to(vdtype)
    w = w0.clone().to(DEV).requires_grad_()
    alpha = a0.clone().to(DEV).requires_grad_()
    out = pni_fast.noisy_weight(w, alpha, seed=SEED, offset=3, backend=api(backend))
    out.backward(g.to(DEV))
    assert out.dtype == vdtype and alpha.grad.dtype == adtype

    w_ref = w0.double().requires_grad_()
    a_ref = a0.double().requires_grad_()
    z = z64(w0.numel(), SEED, 3)
    ref = reference_noisy_weight(w_ref, a_ref, z.reshape(w0.shape))
    ref.backward(g.double())
    sigma = float(w0.double().std())  # the reference's; the kernel's own comes from a device std
    torch.testing.assert_close(flat64(ref), expected_out(w0, a0, sigma, inner, z)[0], rtol=1e-12, atol=1e-12)
    check_perturb(out, w0, a0, sigma, inner, z, sigma_rel=SIGMA_REL[torch.float32])
    assert torch.equal(w.grad.cpu(), g)  # identity
    check_grad(alpha.grad, g, a0, sigma, inner, z, sigma_rel=SIGMA_REL[torch.float32])
    torch.testing.assert_close(flat64(a_ref.grad), grad_terms(g, a0, sigma, inner, z)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inject_noise_channelwise(backend):
    x = torch.randn(4, 6, 7, 7, device=DEV)
    alpha = torch.full((6,), 0.3, device=DEV, requires_grad=True)
    out = pni_fast.inject_noise(x, alpha, seed=5, offset=0, backend=api(backend))
    sigma = pni_fast.weight_sigma(x)  # the same function the op uses: the same value
    check_perturb(out, x, alpha, sigma, 49, z64(x.numel(), 5, 0))
    g = torch.randn_like(x)
    out.backward(g)
    check_grad(alpha.grad, g, alpha, sigma, 49, z64(x.numel(), 5, 0))


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_autocast_grad_scaler(backend, dtype, monkeypatch):
    """A PNI model under autocast: float32 alpha parameters get finite float32 gradients, no inf steps."""
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        pni_fast.NoisyConv2d(3, 8, 3, padding=1, pni="channelwise", noise="both"),
        torch.nn.ReLU(),
        pni_fast.NoisyConv2d(8, 8, 3, padding=1, noise="both"),
        torch.nn.Flatten(),
        pni_fast.NoisyLinear(8 * 8 * 8, 10, pni="channelwise", noise="both"),
    ).to(DEV)
    alphas = {n: p for n, p in model.named_parameters() if n.endswith(("alpha_w", "alpha_i"))}
    assert len(alphas) == 6 and all(p.dtype == torch.float32 for p in alphas.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # a moderate scale: the check is that PNI's gradients stay finite, not how far fp16 activations stretch
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=dtype == torch.float16)
    x = torch.randn(4, 3, 8, 8, device=DEV)
    y = torch.randint(0, 10, (4,), device=DEV)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        assert logits.dtype == dtype
        scaler.scale(loss).backward()
        for name, p in alphas.items():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0), (step, name, p.grad)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == scale, "GradScaler found inf/NaN gradients and skipped the step"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _shaped_alphas(vs, alphas):
    """Flat alphas reshaped as the public API expects them for weights vs."""
    return [
        a.reshape(v.shape)
        if a.numel() == v.numel() and a.numel() > 1
        else (a.reshape((-1,) + (1,) * (v.dim() - 1)) if a.numel() > 1 else a)
        for v, a in zip(vs, alphas)
    ]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("count", [5, 40])
def test_noisy_weights_backward(backend, count):
    vs, gs, alphas, _, _, _ = model_like_lists(count, DEV)
    vs, gs, alphas = vs[:-1], gs[:-1], _shaped_alphas(vs[:-1], alphas[:-1])
    leaves = [a.clone().requires_grad_() for a in alphas]
    outs = pni_fast.noisy_weights(vs, leaves, seed=SEED, backend=api(backend))
    torch.autograd.backward(outs, gs)
    offset = 0
    for k, (v, a, g, leaf, out) in enumerate(zip(vs, alphas, gs, leaves, outs)):
        single = a.clone().requires_grad_()
        ref = pni_fast.noisy_weight(v, single, seed=SEED, offset=offset, backend=api(backend))
        ref.backward(g)
        assert torch.equal(out, ref), k
        if backend == "cuda":
            assert torch.equal(leaf.grad, single.grad), k
        else:
            sigma = pni_fast.weight_sigma(v)
            inner = v.numel() // a.numel() if 1 < a.numel() < v.numel() else 1
            z_own = flat64(pni_fast.randn(v.shape, seed=SEED, offset=offset, device=DEV, backend="triton"))
            for got in (leaf.grad, single.grad):
                check_grad(got, g, a, sigma, inner, z_own, what=f"tensor {k}")
        offset += (v.numel() + 3) // 4
