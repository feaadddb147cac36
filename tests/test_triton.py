"""Triton backend (pni_fast/triton) against the numpy Philox oracle and float64 math.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1 before triton is imported), so sizes stay small:
the interpreter executes every block op in numpy. With a GPU the same tests run on CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import philox_oracle as oracle  # noqa: E402  (tests/ is on sys.path via conftest)

import pni_fast.triton as pt  # noqa: E402  (registers torch.ops.pni_fast.*_triton)
from pni_fast.reference import reference_noisy_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not pt.INTERPRETED:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on CPU tensors",
                allow_module_level=True)
ops = torch.ops.pni_fast
SEED = 0x1234_5678_9ABC  # > 2^32: exercises the high key word
OFFSET = 37

# (shape, alpha numel, inner): every alpha mode, sizes around BLOCK=1024 and not multiples of 4.
CASES = {
    "layerwise-tail": ((7,), 1, 1),
    "layerwise-multi-block": ((3, 1001), 1, 1),
    "weight-channelwise-conv": ((8, 3, 3, 3), 8, 27),
    "weight-channelwise-long-rows": ((3, 2500), 3, 2500),  # inner > BLOCK, not a multiple
    "weight-channelwise-aligned": ((2, 2048), 2, 2048),  # inner % BLOCK == 0
    "weight-elementwise": ((6, 5), 30, 1),
    "act-channelwise-7x7": ((4, 6, 7, 7), 6, 49),  # 2 blocks, a run straddles the block boundary
    "act-channelwise-4x4": ((3, 4, 4, 4), 4, 16),
    "act-per-feature": ((80, 13), 13, 1),
}
LOW_PRECISION_TOL = {torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}  # (out, grad)


def _z64(numel: int, seed: int = SEED, offset: int = OFFSET) -> torch.Tensor:
    return torch.from_numpy(oracle.normal(seed, offset, numel)).to(torch.float64)


def _alpha_index(numel: int, n_alpha: int, inner: int) -> torch.Tensor:
    return (torch.arange(numel) // inner) % n_alpha


def _expected_out(v, alpha, sigma, inner, seed=SEED, offset=OFFSET) -> torch.Tensor:
    n = v.numel()
    a = alpha.double().reshape(-1).cpu()[_alpha_index(n, alpha.numel(), inner)]
    return v.double().reshape(-1).cpu() + a * float(sigma) * _z64(n, seed, offset)


def _expected_grad(g, alpha, sigma, inner, seed=SEED, offset=OFFSET) -> torch.Tensor:
    n = g.numel()
    out = torch.zeros(alpha.numel(), dtype=torch.float64)
    out.index_add_(0, _alpha_index(n, alpha.numel(), inner), g.double().reshape(-1).cpu() * _z64(n, seed, offset))
    return out * float(sigma)


def _inputs(shape, n_alpha, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    alpha = (torch.rand(n_alpha, generator=gen) + 0.1).to(dtype).to(DEVICE)
    sigma = torch.tensor(0.75, dtype=torch.float32, device=DEVICE)
    return v, g, alpha, sigma


# ---------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------


def test_randn4x_contract_constants():
    """The uniform scale and 2*pi of tl.randn4x are the contract's fp32 constants."""
    import inspect

    from triton.language import random

    src = inspect.getsource(random)
    assert "4.6566127342e-10" in src
    assert np.float32(6.283185307179586) == np.float32(6.2831855)
    assert np.float32(4.6566127342e-10).view(np.uint32) == 0x2FFFFFFF


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 1023, 1025, 2051])
# seeds/offsets typed i32, u32 and i64 by triton; counters crossing 2^32
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**31 + 5, 2**31 + 1), (SEED, OFFSET), (2**63 - 1, 2**32 - 3)])
def test_noise_matches_oracle(numel, seed, offset):
    z = ops.noise_triton(torch.empty(numel, device=DEVICE), seed, offset)
    assert z.dtype == torch.float32 and z.shape == (numel,)
    np.testing.assert_allclose(z.cpu().numpy(), oracle.normal(seed, offset, numel), rtol=0, atol=2e-6)


def test_noise_shape_dtype_and_empty():
    like = torch.empty(3, 0, 5, dtype=torch.float16, device=DEVICE)
    z = ops.noise_triton(like, 1, 0)
    assert z.shape == like.shape and z.dtype == torch.float32
    z = ops.noise_triton(torch.empty(2, 3, 5, dtype=torch.bfloat16, device=DEVICE), 1, 0)
    assert z.shape == (2, 3, 5) and z.dtype == torch.float32


def test_noise_counter_ranges_are_consistent():
    """Element i uses counter offset + i // 4: a later window equals a shifted offset."""
    full = ops.noise_triton(torch.empty(2048, device=DEVICE), 9, 100)
    tail = ops.noise_triton(torch.empty(1024, device=DEVICE), 9, 100 + 256)
    assert torch.equal(full[1024:], tail)


def test_noise_statistics():
    z = ops.noise_triton(torch.empty(1 << 14, device=DEVICE), 2024, 0).double().cpu()
    assert abs(z.mean().item()) < 0.05
    assert abs(z.var().item() - 1.0) < 0.05
    # neighbours inside a quad come from different words: no correlation
    assert abs(torch.corrcoef(torch.stack([z[0::2], z[1::2]]))[0, 1].item()) < 0.05


# ---------------------------------------------------------------------------
# perturb / alpha grad against float64 math on the oracle's z
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturb_and_grad_match_float64(case, dtype):
    shape, n_alpha, inner = CASES[case]
    v, g, alpha, sigma = _inputs(shape, n_alpha, dtype)
    out = ops.perturb_triton(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.shape == v.shape and out.dtype == dtype and out.device == v.device
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double().reshape(-1).cpu(), _expected_out(v, alpha, sigma, inner),
                               rtol=0, atol=atol)
    grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.shape == alpha.shape and grad.dtype == dtype
    expected = _expected_grad(g, alpha, sigma, inner)
    torch.testing.assert_close(grad.double().cpu(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("case", ["layerwise-multi-block", "weight-channelwise-conv", "act-channelwise-7x7",
                                  "weight-elementwise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturb_low_precision(case, dtype):
    shape, n_alpha, inner = CASES[case]
    v, g, alpha, _ = _inputs(shape, n_alpha, dtype)
    sigma = torch.tensor(0.75, dtype=dtype, device=DEVICE)  # sigma in v's dtype is allowed too
    out_tol, grad_tol = LOW_PRECISION_TOL[dtype]
    out = ops.perturb_triton(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.dtype == dtype
    # math in fp32, one rounding at the end
    torch.testing.assert_close(out.double().reshape(-1).cpu(), _expected_out(v, alpha, sigma, inner),
                               rtol=out_tol, atol=out_tol)
    grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double().cpu(), _expected_grad(g, alpha, sigma, inner),
                               rtol=grad_tol, atol=grad_tol)


def test_matches_paper_reference_layer_math():
    """perturb with sigma = std(w) is reference_noisy_weight with the same z; its autograd gives alpha's grad."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64)
    alpha = torch.full((6, 1, 1, 1), 0.25, dtype=torch.float64, requires_grad=True)
    z = _z64(w.numel()).reshape(w.shape)
    expected = reference_noisy_weight(w, alpha, z)
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    expected.backward(g)
    sigma = w.std().to(DEVICE)
    out = ops.perturb_triton(w.to(DEVICE), alpha.detach().to(DEVICE), sigma, SEED, OFFSET, 27)
    torch.testing.assert_close(out.cpu(), expected.detach(), rtol=0, atol=1e-12)
    grad = ops.perturb_alpha_grad_triton(g.to(DEVICE), alpha.detach().to(DEVICE), sigma, SEED, OFFSET, 27)
    torch.testing.assert_close(grad.cpu(), alpha.grad, rtol=1e-12, atol=1e-12)


def test_alpha_grad_is_deterministic():
    shape, n_alpha, inner = CASES["act-channelwise-7x7"]
    _, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32)
    a = ops.perturb_alpha_grad_triton(g, alpha, sigma, 5, 0, inner)
    b = ops.perturb_alpha_grad_triton(g, alpha, sigma, 5, 0, inner)
    assert torch.equal(a, b)


def test_non_contiguous_input():
    v = torch.randn(40, 30, device=DEVICE).t()  # [30, 40], not contiguous
    alpha = torch.rand(30, device=DEVICE)
    sigma = torch.tensor(0.5, device=DEVICE)
    out = ops.perturb_triton(v, alpha, sigma, 1, 2, 40)
    assert out.is_contiguous()
    assert torch.equal(out, ops.perturb_triton(v.contiguous(), alpha, sigma, 1, 2, 40))
    g = torch.randn(40, 30, device=DEVICE).t()
    assert torch.equal(ops.perturb_alpha_grad_triton(g, alpha, sigma, 1, 2, 40),
                       ops.perturb_alpha_grad_triton(g.contiguous(), alpha, sigma, 1, 2, 40))


def test_empty_tensors():
    v = torch.empty(0, 4, device=DEVICE)
    alpha = torch.full((1,), 0.3, device=DEVICE)
    sigma = torch.tensor(1.0, device=DEVICE)
    assert ops.perturb_triton(v, alpha, sigma, 1, 0, 1).shape == (0, 4)
    grad = ops.perturb_alpha_grad_triton(v, alpha, sigma, 1, 0, 1)
    assert grad.shape == (1,) and grad.item() == 0.0


# ---------------------------------------------------------------------------
# multi-tensor ops
# ---------------------------------------------------------------------------


def test_multi_equals_single():
    specs = [("layerwise-multi-block", torch.float32), ("weight-channelwise-conv", torch.float32),
             ("weight-elementwise", torch.float32), ("weight-channelwise-long-rows", torch.float32),
             ("act-channelwise-4x4", torch.float16), ("layerwise-tail", torch.float16)]
    vs, gs, alphas, sigmas, offsets, inners = [], [], [], [], [], []
    offset = 5
    for i, (case, dtype) in enumerate(specs):
        shape, n_alpha, inner = CASES[case]
        v, g, alpha, sigma = _inputs(shape, n_alpha, dtype, seed=i)
        vs.append(v), gs.append(g), alphas.append(alpha), sigmas.append(sigma), inners.append(inner)
        offsets.append(offset)
        offset += (v.numel() + 3) // 4
    # an empty tensor in the middle of the list
    vs.insert(2, torch.empty(0, device=DEVICE)), gs.insert(2, torch.empty(0, device=DEVICE))
    alphas.insert(2, torch.ones(1, device=DEVICE)), sigmas.insert(2, torch.tensor(1.0, device=DEVICE))
    offsets.insert(2, 0), inners.insert(2, 1)

    outs = ops.perturb_multi_triton(vs, alphas, sigmas, SEED, offsets, inners)
    grads = ops.perturb_alpha_grad_multi_triton(gs, alphas, sigmas, SEED, offsets, inners)
    assert len(outs) == len(grads) == len(vs)
    for v, g, a, s, off, inner, out, grad in zip(vs, gs, alphas, sigmas, offsets, inners, outs, grads):
        assert torch.equal(out, ops.perturb_triton(v, a, s, SEED, off, inner))
        single = ops.perturb_alpha_grad_triton(g, a, s, SEED, off, inner)
        assert grad.shape == a.shape and grad.dtype == a.dtype
        # Same partials, but the multi kernel reduces every tensor with one (scan) code path, so
        # float32 sums may differ from the single op in the last bits.
        tol = 2e-5 if a.dtype == torch.float32 else 1e-3
        torch.testing.assert_close(grad, single, rtol=tol, atol=tol)


def test_multi_empty_list():
    assert ops.perturb_multi_triton([], [], [], 1, [], []) == []
    assert ops.perturb_alpha_grad_multi_triton([], [], [], 1, [], []) == []


# ---------------------------------------------------------------------------
# argument errors name the argument
# ---------------------------------------------------------------------------


def test_argument_errors():
    v = torch.randn(4, 6, device=DEVICE)
    alpha = torch.rand(4, device=DEVICE)
    sigma = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="alpha must have v's dtype"):
        ops.perturb_triton(v, alpha.double(), sigma, 1, 0, 6)
    with pytest.raises(TypeError, match="v must be float32"):
        ops.perturb_triton(v.int(), alpha.int(), sigma, 1, 0, 6)
    with pytest.raises(ValueError, match="sigma must be a 0-d tensor"):
        ops.perturb_triton(v, alpha, sigma.reshape(1), 1, 0, 6)
    with pytest.raises(ValueError, match="seed must be in"):
        ops.perturb_triton(v, alpha, sigma, -1, 0, 6)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        ops.perturb_alpha_grad_triton(v, alpha, sigma, 1, -4, 6)
    with pytest.raises(ValueError, match="inner must be >= 1"):
        ops.perturb_triton(v, alpha, sigma, 1, 0, 0)
    with pytest.raises(ValueError, match="must tile v"):
        ops.perturb_triton(v, alpha, sigma, 1, 0, 5)
    with pytest.raises(ValueError, match="same length"):
        ops.perturb_multi_triton([v], [alpha, alpha], [sigma], 1, [0], [6])
    if DEVICE == "cpu":
        assert pt.INTERPRETED


# ---------------------------------------------------------------------------
# GPU compilation without a GPU
# ---------------------------------------------------------------------------


def test_kernels_compile_for_sm90_without_approx_math():
    """triton.compile every kernel for sm_90 (bundled ptxas): catches what the interpreter cannot,
    and checks the PTX of the noise path has no lg2/sin/cos/sqrt .approx instruction."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pni_fast.triton.compile_check", "90"], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_opcheck():
    """Schema/fake/autograd-registration checks; the triton_ops' fake tracing needs a GPU
    (under the interpreter wrap_triton would touch fake data), the custom_ops get the full check."""
    v, _, alpha, sigma = _inputs((8, 3, 3, 3), 8, torch.float32)
    single_utils = ("test_schema", "test_autograd_registration")
    if not pt.INTERPRETED:
        single_utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.perturb_triton.default, (v, alpha, sigma, 1, 0, 27), test_utils=single_utils)
    torch.library.opcheck(ops.perturb_alpha_grad_triton.default, (v, alpha, sigma, 1, 0, 27),
                          test_utils=single_utils)
    torch.library.opcheck(ops.noise_triton.default, (v, 1, 0), test_utils=single_utils)
    lists = ([v, v[:2]], [alpha, alpha[:1]], [sigma, sigma], 1, [0, 100], [27, 1])
    torch.library.opcheck(ops.perturb_multi_triton.default, lists)
    torch.library.opcheck(ops.perturb_alpha_grad_multi_triton.default, lists)
