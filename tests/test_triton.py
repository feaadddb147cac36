"""Triton backend (pni_fast/triton) against the numpy Philox oracle and float64 math.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1 before triton is imported), so sizes stay small:
the interpreter executes every block op in numpy. With a GPU the same tests run on CUDA.

Tolerances follow the contract (design.md section 3; tests/tolerances.py): outputs and alpha
gradients are checked against float64 math on the backend's own z (``noise_triton``, same seed
and offset: rounding only) and on the oracle's z (plus ``|alpha sigma| * Z_TOL``). Compiled
kernels use libdevice logf/cosf/sinf, so their z is within Z_TOL of the oracle; under the
interpreter z comes from tl.randn4x in numpy and is asserted bit-equal to the oracle, which makes
the own-z checks as tight as float64 math on the oracle's z.
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

import pni_fast.triton as pt  # noqa: E402  (registers torch.ops.pni_fast.*_triton)
from pni_fast.reference import reference_noisy_weight  # noqa: E402

import philox_oracle as oracle  # noqa: E402  (tests/ is on sys.path via conftest)
from tolerances import Z_TOL, Bounds, flat64, grad_terms  # noqa: E402

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
# The interpreter converts to bfloat16 by truncation (GPUs round to nearest).
BOUNDS = Bounds(bf16_truncates=pt.INTERPRETED)
check_perturb, check_grad = BOUNDS.check_perturb, BOUNDS.check_grad


def _z64(numel: int, seed: int = SEED, offset: int = OFFSET) -> torch.Tensor:
    return torch.from_numpy(oracle.normal(seed, offset, numel)).to(torch.float64)


def _check_noise(z: torch.Tensor, seed: int, offset: int) -> None:
    """z (float32) within Z_TOL of the oracle; bit-equal to it under the interpreter."""
    assert z.dtype == torch.float32
    got, ref = z.reshape(-1).cpu().numpy(), oracle.normal(seed, offset, z.numel())
    np.testing.assert_allclose(got, ref, rtol=0, atol=Z_TOL)
    if pt.INTERPRETED:  # tl.randn4x evaluated in numpy float32, like the oracle
        np.testing.assert_array_equal(got, ref)


def _zs(like: torch.Tensor, seed: int = SEED, offset: int = OFFSET, z: torch.Tensor | None = None):
    """(oracle z, the backend's own z) in float64 for a tensor like ``like``; the own z (``z`` if
    given, else noise_triton's) is checked against the oracle first."""
    if z is None:
        z = ops.noise_triton(like, seed, offset)
    _check_noise(z, seed, offset)
    return _z64(like.numel(), seed, offset), flat64(z)


def _check(out, grad, v, g, alpha, sigma, inner, seed=SEED, offset=OFFSET, what=""):
    """perturb's out and the alpha grad (either may be None) against float64 math on both z."""
    z_oracle, z_own = _zs(v, seed, offset)
    if out is not None:
        check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own, what=f"{what}out")
    if grad is not None:
        check_grad(grad, g, alpha, sigma, inner, z_oracle, z_own, what=f"{what}alpha grad")


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
    _check_noise(z, seed, offset)


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
# perturb / alpha grad against float64 math on the backend's own z and on the oracle's z
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checks_reject_defects(dtype):
    """The contract bounds can fail: noise of a neighbouring offset or seed, one perturbed output
    element or one alpha gradient missing a single term are out of bounds."""
    shape, n_alpha, inner = CASES["act-channelwise-7x7"]
    v, g, alpha, sigma = _inputs(shape, n_alpha, dtype)
    out = ops.perturb_triton(v, alpha, sigma, SEED, OFFSET, inner)
    grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, SEED, OFFSET, inner)
    _check(out, grad, v, g, alpha, sigma, inner)
    for seed, offset in ((SEED, OFFSET + 1), (SEED + 1, OFFSET)):
        with pytest.raises(AssertionError, match="out of bounds"):
            _check(out, None, v, g, alpha, sigma, inner, seed, offset)
        with pytest.raises(AssertionError, match="out of bounds"):
            _check(None, grad, v, g, alpha, sigma, inner, seed, offset)
    z = _z64(v.numel())
    bumped = out.clone()  # ten times the rounding of the dtype and the noise allowance
    bumped.view(-1)[100] += 10 * max(Z_TOL, BOUNDS.unit_out(dtype)) * (1 + abs(float(out.view(-1)[100])))
    with pytest.raises(AssertionError, match=f"1 of {v.numel()} elements"):
        check_perturb(bumped, v, alpha, sigma, inner, z)
    gz = flat64(g) * z
    i = int(gz.abs().argmax())  # drop the largest term of one alpha gradient
    lost = grad.clone()
    lost[(i // inner) % n_alpha] -= float(sigma) * float(gz[i])
    with pytest.raises(AssertionError, match=f"1 of {n_alpha} elements"):
        check_grad(lost, g, alpha, sigma, inner, z)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturb_and_grad_match_float64(case, dtype):
    shape, n_alpha, inner = CASES[case]
    v, g, alpha, sigma = _inputs(shape, n_alpha, dtype)
    out = ops.perturb_triton(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.shape == v.shape and out.dtype == dtype and out.device == v.device
    grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.shape == alpha.shape and grad.dtype == dtype
    _check(out, grad, v, g, alpha, sigma, inner)


@pytest.mark.parametrize("case", ["layerwise-multi-block", "weight-channelwise-conv", "act-channelwise-7x7",
                                  "weight-elementwise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturb_low_precision(case, dtype):
    shape, n_alpha, inner = CASES[case]
    v, g, alpha, _ = _inputs(shape, n_alpha, dtype)
    sigma = torch.tensor(0.75, dtype=dtype, device=DEVICE)  # sigma in v's dtype is allowed too
    out = ops.perturb_triton(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.dtype == dtype
    grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.dtype == dtype
    _check(out, grad, v, g, alpha, sigma, inner)  # math in fp32, one rounding at the end


def test_matches_paper_reference_layer_math():
    """perturb with sigma = std(w) is reference_noisy_weight with the same z (the backend's own,
    float64 math: agreement to float64 rounding); its autograd gives alpha's grad. Against the
    oracle's z, the contract bounds."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64)
    alpha = torch.full((6, 1, 1, 1), 0.25, dtype=torch.float64, requires_grad=True)
    z_oracle, z_own = _zs(w.to(DEVICE))
    expected = reference_noisy_weight(w, alpha, z_own.reshape(w.shape))
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    expected.backward(g)
    sigma = w.std().to(DEVICE)
    out = ops.perturb_triton(w.to(DEVICE), alpha.detach().to(DEVICE), sigma, SEED, OFFSET, 27)
    torch.testing.assert_close(out.cpu(), expected.detach(), rtol=0, atol=1e-12)
    grad = ops.perturb_alpha_grad_triton(g.to(DEVICE), alpha.detach().to(DEVICE), sigma, SEED, OFFSET, 27)
    torch.testing.assert_close(grad.cpu(), alpha.grad, rtol=1e-12, atol=1e-12)
    check_perturb(out, w, alpha, sigma, 27, z_oracle)
    check_grad(grad, g, alpha, sigma, 27, z_oracle)


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
        # float32 sums may differ from the single op's in order: each within the contract bound.
        if v.numel():
            z_oracle, z_own = _zs(v, SEED, off)
            for got, what in ((grad, "multi"), (single, "single")):
                check_grad(got, g, a, s, inner, z_oracle, z_own, what=f"{what} alpha grad")
        else:
            assert torch.equal(grad, torch.zeros_like(a)) and torch.equal(single, grad)


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
    with pytest.raises(TypeError, match=r"alpha must have dtype torch.float32 \(the dtype of v\)"):
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
    with pytest.raises(ValueError, match="does not fit v"):
        ops.perturb_triton(v, alpha, sigma, 1, 0, 5)
    with pytest.raises(ValueError, match="same length"):
        ops.perturb_multi_triton([v], [alpha, alpha], [sigma], 1, [0], [6])
    if DEVICE == "cpu":
        assert pt.INTERPRETED


# ---------------------------------------------------------------------------
# GPU compilation without a GPU
# ---------------------------------------------------------------------------


def test_kernels_compile_for_sm90_without_approx_math():
    """triton.compile every kernel for sm_90 (bundled ptxas) through Triton's launch binder, in the
    aligned (pointers and sizes divisible by 16: vectorized) and unaligned variants real tensors
    get: catches what the interpreter cannot, checks that no PTX has an .approx instruction or an
    ftz sqrt, that the aligned element-wise variants vectorize, and that seeds and offsets of
    1, 16, 17 share one compiled kernel."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pni_fast.triton.compile_check", "90"], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck(with_state):
    """Schema, fake kernel, autograd registration and AOT dispatch of every op (under the interpreter
    the single ops are custom_ops whose fake kernel skips the launch)."""
    v, _, alpha, sigma = _inputs((8, 3, 3, 3), 8, torch.float32)
    state = (torch.tensor([SEED, 40], device=DEVICE),) if with_state else ()
    torch.library.opcheck(ops.perturb_triton.default, (v, alpha, sigma, 1, 0, 27) + state)
    torch.library.opcheck(ops.perturb_alpha_grad_triton.default, (v, alpha, sigma, 1, 0, 27) + state)
    torch.library.opcheck(ops.noise_triton.default, (v, 1, 0) + state)
    lists = ([v, v[:2]], [alpha, alpha[:1]], [sigma, sigma], 1, [0, 100], [27, 1]) + state
    torch.library.opcheck(ops.perturb_multi_triton.default, lists)
    torch.library.opcheck(ops.perturb_alpha_grad_multi_triton.default, lists)


def _subprocess_without_interpreter(code: str) -> subprocess.CompletedProcess:
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# specialization: one compiled kernel for every seed
# ---------------------------------------------------------------------------


def _kernels():
    from pni_fast.triton import kernels as K

    return {name: getattr(K, name) for name in dir(K) if name.endswith("_kernel")}


def test_seed_and_offset_are_not_specialized():
    """Every kernel taking a seed or an offset lists them in do_not_specialize (Triton would
    otherwise compile again for values equal to 1 or divisible by 16)."""
    import inspect

    checked = 0
    for name, fn in _kernels().items():
        params = inspect.signature(fn.fn).parameters
        dns = fn.kwargs.get("do_not_specialize") if pt.INTERPRETED else fn.do_not_specialize
        for arg in ("seed", "offset"):
            if arg in params:
                assert arg in set(dns or ()), f"{name}: {arg} is not in do_not_specialize"
                checked += 1
    assert checked == 8  # noise, fwd, bwd: seed + offset; multi fwd / bwd: seed


def test_seeds_16_and_17_share_one_compiled_kernel():
    """Triton's own launch binder (sm_90, no GPU needed) gives seeds 16 and 17 one cache key;
    the same kernel without do_not_specialize gives two (so the check can fail)."""
    proc = _subprocess_without_interpreter("""
import torch, triton
from pni_fast.triton import kernels as K
from pni_fast.triton.compile_check import cache_key
out = torch.empty(4096)
kw = dict(BLOCK=1024, HAS_STATE=False, PRECISE=True)
same = {cache_key(K._noise_kernel, (out, out, 4096, seed, 16), kw) for seed in (16, 17)}
plain = triton.jit(K._noise_kernel.fn)
different = {cache_key(plain, (out, out, 4096, seed, 16), kw) for seed in (16, 17)}
print(len(same), len(different))
""")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["1", "2"]


# ---------------------------------------------------------------------------
# torch.compile with a seed drawn inside the graph (a SymInt)
# ---------------------------------------------------------------------------


def test_torch_compile_with_drawn_seed_fullgraph():
    """A seed from .item() is an unbacked SymInt: the argument checks must not guard on it."""
    import torch._dynamo

    shape, n_alpha, inner = CASES["weight-channelwise-conv"]
    v, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32)

    def f(v, g, alpha, sigma, seed_t):
        seed = seed_t.item()
        out = ops.perturb_triton(v, alpha, sigma, seed, OFFSET, inner)
        grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, seed, OFFSET, inner)
        z = ops.noise_triton(v, seed, OFFSET)
        outs = ops.perturb_multi_triton([v], [alpha], [sigma], seed, [OFFSET], [inner])
        grads = ops.perturb_alpha_grad_multi_triton([g], [alpha], [sigma], seed, [OFFSET], [inner])
        return out, grad, z, outs[0], grads[0]

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        for seed in (SEED, 16):
            out, grad, z, out_m, grad_m = compiled(v, g, alpha, sigma, torch.tensor(seed))
            z_oracle, z_own = _zs(v, seed, OFFSET, z=z)  # the compiled graph's own noise
            check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own)
            assert torch.equal(out_m, out)
            for got, what in ((grad, "single"), (grad_m, "multi")):
                check_grad(got, g, alpha, sigma, inner, z_oracle, z_own, what=f"{what} alpha grad")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# op contract v2: rng_state, float32 alpha with half tensors, fresh outputs, zero-size tensors
# ---------------------------------------------------------------------------


def _state(seed: int, base: int) -> torch.Tensor:
    return torch.tensor([seed, base], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("case", ["layerwise-multi-block", "weight-channelwise-long-rows", "act-channelwise-7x7",
                                  "weight-elementwise"])
def test_rng_state_equals_seed_and_offset(case):
    """rng_state (seed, base) draws exactly the noise of seed=seed, offset=base+offset; the seed
    argument is ignored and the state is not modified."""
    shape, n_alpha, inner = CASES[case]
    v, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32)
    seed, base, offset = 2**62 + 12345, 2**33 + 7, 11
    state = _state(seed, base)
    z = ops.noise_triton(v, 0, offset, state)
    assert torch.equal(z, ops.noise_triton(v, seed, base + offset))
    z_oracle, z_own = _zs(v, seed, base + offset, z=z)
    out = ops.perturb_triton(v, alpha, sigma, 0, offset, inner, state)
    check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own)
    assert torch.equal(out, ops.perturb_triton(v, alpha, sigma, seed, base + offset, inner))
    assert torch.equal(out, ops.perturb_triton(v, alpha, sigma, 999, offset, inner, state))  # seed ignored
    grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, 0, offset, inner, state)
    check_grad(grad, g, alpha, sigma, inner, z_oracle, z_own)
    assert torch.equal(grad, ops.perturb_alpha_grad_triton(g, alpha, sigma, seed, base + offset, inner))
    assert state.tolist() == [seed, base]


def test_rng_state_multi_ops():
    """The list ops honour rng_state (every tensor's counters start at base + its offset)."""
    vs, gs, alphas, sigmas, offsets, inners = [], [], [], [], [], []
    for i, case in enumerate(["weight-channelwise-conv", "layerwise-tail", "act-per-feature"]):
        shape, n_alpha, inner = CASES[case]
        v, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32, seed=i)
        vs.append(v), gs.append(g), alphas.append(alpha), sigmas.append(sigma), inners.append(inner)
        offsets.append(1000 * i)
    seed, base = 77, 2**40
    state = _state(seed, base)
    outs = ops.perturb_multi_triton(vs, alphas, sigmas, 0, offsets, inners, state)
    grads = ops.perturb_alpha_grad_multi_triton(gs, alphas, sigmas, 0, offsets, inners, state)
    shifted = [base + o for o in offsets]
    for out, ref in zip(outs, ops.perturb_multi_triton(vs, alphas, sigmas, seed, shifted, inners)):
        assert torch.equal(out, ref)
    for v, g, a, s, off, inner, out, grad in zip(vs, gs, alphas, sigmas, shifted, inners, outs, grads):
        _check(out, grad, v, g, a, s, inner, seed, off)
    assert state.tolist() == [seed, base]


def test_rng_state_errors():
    v = torch.randn(4, 6, device=DEVICE)
    alpha = torch.rand(4, device=DEVICE)
    sigma = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="rng_state must be an int64 tensor"):
        ops.perturb_triton(v, alpha, sigma, 0, 0, 6, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"rng_state must have shape \[2\]"):
        ops.noise_triton(v, 0, 0, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="rng_state must be contiguous"):
        ops.perturb_alpha_grad_triton(v, alpha, sigma, 0, 0, 6, torch.zeros(4, dtype=torch.int64, device=DEVICE)[::2])
    with pytest.raises(ValueError, match="rng_state must have shape"):
        ops.perturb_multi_triton([v], [alpha], [sigma], 0, [0], [6], torch.zeros(1, dtype=torch.int64, device=DEVICE))
    if DEVICE == "cpu":  # on CUDA the values stay on the device and are not checked (no host sync)
        with pytest.raises(ValueError, match=r"rng_state\[0\] \(the seed\) must be in"):
            ops.perturb_triton(v, alpha, sigma, 0, 0, 6, _state(-1, 0))
        with pytest.raises(ValueError, match="counter base"):
            ops.noise_triton(v, 0, 0, _state(1, -5))
        with pytest.raises(ValueError, match="offset \\+ ceil"):
            ops.perturb_alpha_grad_multi_triton([v], [alpha], [sigma], 0, [4], [6], _state(1, 2**63 - 8))


def test_counter_limit():
    """offset + ceil(numel / 4) < 2**63: the last counter, offset + ceil(numel / 4) - 1, stays below 2**63 - 1."""
    like = torch.empty(8, device=DEVICE)  # 2 counters
    _check_noise(ops.noise_triton(like, 3, 2**63 - 3), 3, 2**63 - 3)
    with pytest.raises(ValueError, match="offset \\+ ceil"):
        ops.noise_triton(like, 3, 2**63 - 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["layerwise-multi-block", "act-channelwise-7x7", "weight-elementwise"])
def test_float32_alpha_with_half_tensors(dtype, case):
    """AMP: float32 alpha with float16/bfloat16 v; the alpha gradient comes back in float32."""
    shape, n_alpha, inner = CASES[case]
    v, g, _, _ = _inputs(shape, n_alpha, dtype)
    alpha = (torch.rand(n_alpha, generator=torch.Generator().manual_seed(5)) + 0.1).to(DEVICE)
    sigma = torch.tensor(0.75, dtype=torch.float32, device=DEVICE)
    out = ops.perturb_triton(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.dtype == dtype
    grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.dtype == torch.float32 and grad.shape == alpha.shape
    # g is exact in float32; only the fp32 accumulation rounds (no rounding to the half dtype)
    z_oracle, z_own = _zs(v)
    check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own)
    check_grad(grad, g, alpha, sigma, inner, z_oracle, z_own)
    outs = ops.perturb_multi_triton([v, v], [alpha, alpha.to(dtype)], [sigma, sigma], SEED, [OFFSET, OFFSET],
                                    [inner, inner])
    assert torch.equal(outs[0], out) and outs[1].dtype == dtype
    grads = ops.perturb_alpha_grad_multi_triton([g, g], [alpha, alpha.to(dtype)], [sigma, sigma], SEED,
                                                [OFFSET, OFFSET], [inner, inner])
    assert grads[0].dtype == torch.float32 and grads[1].dtype == dtype
    check_grad(grads[0], g, alpha, sigma, inner, z_oracle, z_own, what="multi alpha grad")
    check_grad(grads[1], g, alpha.to(dtype), sigma, inner, z_oracle, z_own, what="multi alpha grad, half alpha")


@pytest.mark.slow
def test_float32_alpha_grad_does_not_overflow_with_float16():
    """An fp16 tensor (4M elements on CUDA, 512K under the slow interpreter) whose exact alpha
    gradient is above float16's 65504: with float32 alpha it is finite and matches float64 math."""
    rows = 4
    cols = 2**20 if DEVICE == "cuda" else 2**17
    n = rows * cols
    z = oracle.normal(SEED, OFFSET, n).astype(np.float64)
    g = torch.from_numpy(z).to(torch.float16).reshape(rows, cols)  # g ~ z: every term g * z is >= 0
    sigma = torch.tensor(0.75, dtype=torch.float32)
    for alpha in (torch.ones(1), torch.ones(rows, 1)):  # layerwise, channelwise
        inner = 1 if alpha.numel() == 1 else cols
        grad = ops.perturb_alpha_grad_triton(g.to(DEVICE), alpha.to(DEVICE), sigma.to(DEVICE), SEED, OFFSET, inner)
        assert grad.dtype == torch.float32 and grad.shape == alpha.shape
        expected, _, _ = grad_terms(g, alpha, sigma, inner, torch.from_numpy(z))
        assert torch.all(expected.abs() > 65504)
        assert torch.isfinite(grad).all()
        check_grad(grad, g, alpha, sigma, inner, torch.from_numpy(z))  # the oracle's z: within the contract


def test_outputs_are_fresh_tensors():
    v, g, alpha, sigma = _inputs((4, 6), 4, torch.float32)
    alpha = alpha.reshape(4, 1)
    results = [ops.perturb_triton(v, alpha, sigma, 1, 0, 6), ops.perturb_alpha_grad_triton(g, alpha, sigma, 1, 0, 6),
               ops.noise_triton(v, 1, 0)]
    results += ops.perturb_multi_triton([v], [alpha], [sigma], 1, [0], [6])
    results += ops.perturb_alpha_grad_multi_triton([g], [alpha], [sigma], 1, [0], [6])
    inputs = {t.untyped_storage().data_ptr() for t in (v, g, alpha, sigma)}
    for r in results:
        assert r.untyped_storage().data_ptr() not in inputs


def test_zero_size_tensor_with_channelwise_alpha():
    """A [4, 0] weight with channelwise alpha [4, 1] (the layer passes inner = 0): empty output,
    zero alpha gradient in alpha's dtype."""
    v = torch.empty(4, 0, dtype=torch.float16, device=DEVICE)
    alpha = torch.full((4, 1), 0.5, device=DEVICE)  # float32 alpha with a float16 tensor
    sigma = torch.tensor(1.0, device=DEVICE)
    for inner in (0, 1):
        out = ops.perturb_triton(v, alpha, sigma, 1, 0, inner)
        assert out.shape == (4, 0) and out.dtype == torch.float16
        grad = ops.perturb_alpha_grad_triton(v, alpha, sigma, 1, 0, inner)
        assert grad.shape == (4, 1) and grad.dtype == torch.float32 and torch.equal(grad, torch.zeros_like(grad))
        assert ops.perturb_multi_triton([v], [alpha], [sigma], 1, [0], [inner])[0].shape == (4, 0)
        grads = ops.perturb_alpha_grad_multi_triton([v], [alpha], [sigma], 1, [0], [inner], _state(1, 0))
        assert torch.equal(grads[0], torch.zeros(4, 1, device=DEVICE))
    with pytest.raises(ValueError, match="inner must be >= 1"):
        ops.perturb_triton(torch.ones(4, 1, device=DEVICE), alpha, sigma, 1, 0, 0)
