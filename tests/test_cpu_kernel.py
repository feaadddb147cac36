"""The C++ CPU kernels (torch.ops.pni_fast.*) against the independent numpy oracle.

Philox words and uniforms must match bit for bit, normals within 2e-6 (design.md
section 3); forward and alpha gradient are checked against float64 numpy math built
from the oracle's noise.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import philox_oracle as oracle
from pni_fast import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension unavailable: {_ext.status_message()}")

ops = torch.ops.pni_fast
Z_TOL = 2e-6

SEEDS = [0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1]
OFFSETS = [0, 7, 2**32 - 3, 2**40, 2**62]


def oracle_z(seed: int, offset: int, n: int) -> np.ndarray:
    return oracle.normal(seed, offset, n).astype(np.float64)


def alpha_index(n: int, na: int, inner: int) -> np.ndarray:
    """The contract's broadcast rule: element i uses alpha_flat[(i // inner) % na]."""
    if na == 1:
        return np.zeros(n, dtype=np.int64)
    return (np.arange(n) // inner) % na


# (v shape, alpha shape, inner): the alpha modes of the contract
CASES = {
    "layerwise": ((64, 3, 3, 3), (), 1),
    "weight_channelwise": ((16, 8, 3, 3), (16, 1, 1, 1), 8 * 9),
    "linear_channelwise": ((10, 7), (10, 1), 7),
    "elementwise": ((12, 5, 3, 3), (12, 5, 3, 3), 1),
    "act_channelwise": ((4, 6, 5, 5), (6,), 25),
    "act_channelwise_small_hw": ((3, 5, 2, 3), (5,), 6),
    "act_per_feature": ((9, 33), (33,), 1),
    "big_layerwise": ((300_001,), (), 1),
    "big_rows_multi_item": ((5, 40, 1000), (40,), 1000),
    "big_columns_tiles": ((3, 10_000), (10_000,), 1),
    "columns_tiles_inner2": ((3, 3000, 2), (3000,), 2),
}


def make(shape, alpha_shape, dtype=torch.float32, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    alpha = (0.1 + torch.rand(alpha_shape, generator=g, dtype=torch.float64)).to(dtype)
    return v, alpha


# ---------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_words_and_uniforms_bit_exact(seed, offset):
    n = 1001
    like = torch.empty(n)
    words = ops.rng_words(like, seed, offset)
    assert words.dtype == torch.int32 and words.shape == (1004,)
    expected = oracle.words(seed, offset, n)
    np.testing.assert_array_equal(words.numpy().view(np.uint32), expected)
    uni = ops.rng_uniform(like, seed, offset)
    assert uni.dtype == torch.float32
    np.testing.assert_array_equal(uni.numpy(), oracle.uniform(expected))


def test_words_known_answer_zero_counter():
    # Random123 kat_vectors philox4x32_10: counter 0, key 0
    w = ops.rng_words(torch.empty(4), 0, 0).numpy().view(np.uint32)
    assert [hex(x) for x in w] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.parametrize("seed", [0, 987654321, 2**33 + 17, 2**63 - 1])
@pytest.mark.parametrize("offset", [0, 3, 2**32 - 10, 2**62])
@pytest.mark.parametrize("n", [1, 3, 257, 4099])
def test_noise_matches_oracle(seed, offset, n):
    z = ops.noise(torch.empty(n, dtype=torch.float16), seed, offset)
    assert z.dtype == torch.float32 and z.shape == (n,)
    np.testing.assert_allclose(z.numpy(), oracle_z(seed, offset, n), rtol=0, atol=Z_TOL)


def test_noise_keeps_shape_and_is_prefix_consistent():
    z = ops.noise(torch.empty(6, 7, 5), 42, 9)
    assert z.shape == (6, 7, 5) and z.is_contiguous()
    flat = ops.noise(torch.empty(1000), 42, 9)
    # element i depends only on (seed, offset, i): a shorter tensor is a prefix
    assert torch.equal(z.reshape(-1), flat[:210])
    # offset advances by counters: element 4k of offset o+1 is element 4k+4 of offset o
    shifted = ops.noise(torch.empty(996), 42, 10)
    assert torch.equal(shifted, flat[4:])


def test_noise_statistics():
    z = ops.noise(torch.empty(1 << 18), 2024, 0).double()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1) < 0.01
    # no correlation between neighbours inside a quad and across quads
    for lag in (1, 2, 3, 4, 5):
        c = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(c) < 0.01, (lag, c)


# ---------------------------------------------------------------------------
# perturb (forward)
# ---------------------------------------------------------------------------


def expected_forward(v: torch.Tensor, alpha: torch.Tensor, sigma: float, seed: int, offset: int, inner: int):
    n = v.numel()
    z = oracle_z(seed, offset, n)
    a = alpha.double().reshape(-1).numpy()[alpha_index(n, alpha.numel(), inner)]
    return v.double().reshape(-1).numpy() + a * sigma * z


@pytest.mark.parametrize("case", list(CASES))
def test_perturb_matches_oracle(case):
    shape, alpha_shape, inner = CASES[case]
    v, alpha = make(shape, alpha_shape)
    sigma = v.std()
    seed, offset = 2**35 + 11, 1234
    out = ops.perturb(v, alpha, sigma, seed, offset, inner)
    assert out.shape == v.shape and out.dtype == v.dtype and out.is_contiguous()
    exp = expected_forward(v, alpha, sigma.item(), seed, offset, inner)
    np.testing.assert_allclose(out.reshape(-1).double().numpy(), exp, rtol=1e-6, atol=1e-5)


def test_perturb_equals_v_plus_scaled_noise_exactly():
    v, alpha = make((1000,), ())
    sigma = torch.tensor(0.5)
    out = ops.perturb(v, alpha, sigma, 5, 6, 1)
    z = ops.noise(v, 5, 6)
    assert torch.equal(out, v + (alpha * sigma) * z)


def test_perturb_does_not_modify_inputs():
    v, alpha = make((33, 17), (33, 1))
    v0, a0 = v.clone(), alpha.clone()
    ops.perturb(v, alpha, v.std(), 1, 0, 17)
    ops.perturb_alpha_grad(v, alpha, v.std(), 1, 0, 17)
    assert torch.equal(v, v0) and torch.equal(alpha, a0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_perturb_dtypes(dtype, tol):
    shape, alpha_shape, inner = CASES["weight_channelwise"]
    v, alpha = make(shape, alpha_shape, dtype)
    for sigma in (v.float().std(), v.float().std().to(dtype)):
        out = ops.perturb(v, alpha, sigma, 77, 5, inner)
        assert out.dtype == dtype and out.shape == v.shape
        exp = expected_forward(v, alpha, sigma.double().item(), 77, 5, inner)
        np.testing.assert_allclose(out.reshape(-1).double().numpy(), exp, rtol=tol, atol=tol)


def test_perturb_float64_uses_double_math():
    v = torch.full((8,), 1.0, dtype=torch.float64) + 1e-12
    alpha = torch.tensor(1e-9, dtype=torch.float64)
    out = ops.perturb(v, alpha, torch.tensor(1.0, dtype=torch.float64), 3, 0, 1)
    z = ops.noise(v, 3, 0).double()
    torch.testing.assert_close(out, v + 1e-9 * z, rtol=0, atol=1e-15)


def test_perturb_non_contiguous_inputs():
    v, alpha = make((40, 30), (40, 30))
    sigma = v.std()
    vt, at_ = v.t(), alpha.t()  # non-contiguous views, shape (30, 40)
    assert not vt.is_contiguous()
    out = ops.perturb(vt, at_, sigma, 9, 0, 1)
    assert out.shape == (30, 40) and out.is_contiguous()
    assert torch.equal(out, ops.perturb(vt.contiguous(), at_.contiguous(), sigma, 9, 0, 1))
    # channels_last conv weight: values in logical (row-major) order
    w, a = make((8, 4, 3, 3), (8, 1, 1, 1))
    wcl = w.to(memory_format=torch.channels_last)
    assert torch.equal(ops.perturb(wcl, a, w.std(), 4, 2, 36), ops.perturb(w, a, w.std(), 4, 2, 36))


def test_perturb_propagates_nan_and_inf():
    v = torch.zeros(300)
    v[5], v[260] = float("nan"), float("inf")
    out = ops.perturb(v, torch.tensor(0.25), torch.tensor(1.0), 8, 0, 1)
    assert torch.isnan(out[5]) and torch.isinf(out[260])
    mask = torch.ones(300, dtype=torch.bool)
    mask[[5, 260]] = False
    assert torch.isfinite(out[mask]).all()


def test_empty_tensors():
    v = torch.empty(0, 3)
    alpha = torch.tensor(0.25)
    out = ops.perturb(v, alpha, torch.tensor(1.0), 1, 0, 1)
    assert out.shape == (0, 3)
    g = ops.perturb_alpha_grad(v, alpha, torch.tensor(1.0), 1, 0, 1)
    assert g.shape == () and g.item() == 0.0
    assert ops.noise(v, 1, 0).shape == (0, 3)
    assert ops.rng_words(v, 1, 0).shape == (0,)
    assert ops.rng_uniform(v, 1, 0).shape == (0,)
    outs = ops.perturb_multi([v], [alpha], [torch.tensor(1.0)], 1, [0], [1])
    assert outs[0].shape == (0, 3)


# ---------------------------------------------------------------------------
# alpha gradient
# ---------------------------------------------------------------------------


def expected_alpha_grad(g: torch.Tensor, alpha: torch.Tensor, sigma: float, seed: int, offset: int, inner: int):
    n = g.numel()
    z = oracle_z(seed, offset, n)
    idx = alpha_index(n, alpha.numel(), inner)
    terms = g.double().reshape(-1).numpy() * sigma * z
    sums = np.bincount(idx, weights=terms, minlength=alpha.numel())
    scale = np.sqrt(np.bincount(idx, weights=terms**2, minlength=alpha.numel()))  # error scale per entry
    return sums.reshape(tuple(alpha.shape)), scale.reshape(tuple(alpha.shape))


@pytest.mark.parametrize("case", list(CASES))
def test_alpha_grad_matches_float64(case):
    shape, alpha_shape, inner = CASES[case]
    grad, alpha = make(shape, alpha_shape, gen_seed=1)
    sigma = torch.tensor(0.37)
    seed, offset = 99, 2**32 - 5
    got = ops.perturb_alpha_grad(grad, alpha, sigma, seed, offset, inner)
    assert got.shape == alpha.shape and got.dtype == alpha.dtype
    exp, scale = expected_alpha_grad(grad, alpha, 0.37, seed, offset, inner)
    err = np.abs(got.double().numpy() - exp)
    assert np.all(err <= 1e-5 * scale + 1e-6), f"max err {err.max()}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float16, 2e-2), (torch.bfloat16, 2e-2)])
def test_alpha_grad_dtypes(dtype, tol):
    shape, alpha_shape, inner = CASES["act_channelwise"]
    grad, alpha = make(shape, alpha_shape, dtype, gen_seed=2)
    got = ops.perturb_alpha_grad(grad, alpha, torch.tensor(0.5), 3, 4, inner)
    assert got.dtype == dtype
    exp, scale = expected_alpha_grad(grad, alpha, 0.5, 3, 4, inner)
    # the kernel regenerates z in fp32; float64 math only changes the accumulation
    err = np.abs(got.double().numpy() - exp)
    assert np.all(err <= tol * (np.abs(exp) + scale) + 1e-5 * scale), f"max err {err.max()}"


@pytest.mark.parametrize(
    "case", ["big_layerwise", "big_rows_multi_item", "big_columns_tiles", "act_per_feature", "columns_tiles_inner2"]
)
def test_determinism_across_runs_and_threads(case):
    shape, alpha_shape, inner = CASES[case]
    grad, alpha = make(shape, alpha_shape, gen_seed=3)
    sigma = torch.tensor(1.3)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(
                (ops.perturb(grad, alpha, sigma, 11, 0, inner), ops.perturb_alpha_grad(grad, alpha, sigma, 11, 0, inner))
            )
    finally:
        torch.set_num_threads(before)
    for fwd, bwd in results[1:]:
        assert torch.equal(fwd, results[0][0])
        assert torch.equal(bwd.view(-1).view(torch.int32), results[0][1].view(-1).view(torch.int32))


def test_alpha_grad_is_gradient_of_perturb():
    # d/dalpha sum(grad * perturb(v, alpha)) via autograd on the explicit formula
    v, alpha = make((6, 4, 3, 3), (6, 1, 1, 1))
    grad = torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
    sigma = v.std()
    z = ops.noise(v, 21, 3)
    a = alpha.clone().requires_grad_(True)
    (grad * (v + a * sigma * z)).sum().backward()
    got = ops.perturb_alpha_grad(grad, alpha, sigma, 21, 3, 36)
    torch.testing.assert_close(got, a.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# list ops
# ---------------------------------------------------------------------------


def test_multi_ops_equal_single_ops():
    names = ["layerwise", "weight_channelwise", "elementwise", "act_per_feature"]
    vs, alphas, inners = [], [], []
    for i, name in enumerate(names):
        shape, alpha_shape, inner = CASES[name]
        v, a = make(shape, alpha_shape, gen_seed=10 + i)
        vs.append(v)
        alphas.append(a)
        inners.append(inner)
    sigmas = [v.std() for v in vs]
    offsets = [0, 500, 10_000, 2**40]
    outs = ops.perturb_multi(vs, alphas, sigmas, 17, offsets, inners)
    grads = ops.perturb_alpha_grad_multi(vs, alphas, sigmas, 17, offsets, inners)
    for i in range(len(vs)):
        assert torch.equal(outs[i], ops.perturb(vs[i], alphas[i], sigmas[i], 17, offsets[i], inners[i]))
        assert torch.equal(grads[i], ops.perturb_alpha_grad(vs[i], alphas[i], sigmas[i], 17, offsets[i], inners[i]))


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

F = torch.float32


def _call(v=None, alpha=None, sigma=None, seed=1, offset=0, inner=1, op="perturb"):
    v = torch.randn(4, 3) if v is None else v
    alpha = torch.tensor(0.25) if alpha is None else alpha
    sigma = torch.tensor(1.0) if sigma is None else sigma
    return getattr(ops, op)(v, alpha, sigma, seed, offset, inner)


@pytest.mark.parametrize("op", ["perturb", "perturb_alpha_grad"])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(v=torch.ones(4, 3, dtype=torch.int32), alpha=torch.tensor(1, dtype=torch.int32)), "must be float32"),
        (dict(v=torch.ones(4, dtype=torch.bool), alpha=torch.tensor(True)), "must be float32"),
        (dict(alpha=torch.tensor(0.25, dtype=torch.float64)), "alpha must have the dtype"),
        (dict(alpha=torch.empty(0)), "at least one element"),
        (dict(alpha=torch.ones(5)), r"does not fit .* shape \[4, 3\]"),
        (dict(alpha=torch.ones(4, 1), inner=2), "multiple of inner"),
        (dict(sigma=torch.ones(1)), "sigma must be a 0-d tensor"),
        (dict(sigma=torch.tensor(1.0, dtype=torch.float64)), "sigma must be float32 or"),
        (dict(seed=-1), r"seed must be in \[0, 2\^63\)"),
        (dict(offset=-5), "offset must be >= 0"),
        (dict(offset=2**63 - 2), r"offset \+ ceil\(numel / 4\) must be < 2\^63"),
        (dict(inner=0), "inner must be >= 1"),
    ],
)
def test_argument_checks(op, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        _call(op=op, **kwargs)


def test_argument_checks_names_grad():
    with pytest.raises(RuntimeError, match="grad must be float32"):
        _call(v=torch.ones(3, dtype=torch.int64), alpha=torch.tensor(1), op="perturb_alpha_grad")


@pytest.mark.parametrize("op", ["noise", "rng_words", "rng_uniform"])
def test_rng_op_checks(op):
    with pytest.raises(RuntimeError, match="seed must be"):
        getattr(ops, op)(torch.empty(3), -2, 0)
    with pytest.raises(RuntimeError, match="offset must be"):
        getattr(ops, op)(torch.empty(3), 2, -1)
    with pytest.raises(RuntimeError, match="must be < 2"):
        getattr(ops, op)(torch.empty(9), 2, 2**63 - 2)
    assert getattr(ops, op)(torch.empty(4), 2, 2**63 - 2).numel() == 4  # last counter 2^63 - 2 is fine


def test_multi_checks():
    v = torch.randn(5)
    a, s = torch.tensor(0.25), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="same length"):
        ops.perturb_multi([v, v], [a], [s, s], 1, [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="same length"):
        ops.perturb_alpha_grad_multi([v], [a], [s], 1, [0, 1], [1])
    with pytest.raises(RuntimeError, match=r"vs\[1\]: alpha must have the dtype"):
        ops.perturb_multi([v, v], [a, a.double()], [s, s], 1, [0, 2], [1, 1])
    with pytest.raises(RuntimeError, match=r"grads\[0\]: offset must be >= 0"):
        ops.perturb_alpha_grad_multi([v], [a], [s], 1, [-1], [1])


# ---------------------------------------------------------------------------
# SIMD variants (csrc/cpu/normal_block.cpp picks AVX-512, AVX2 or generic at run time)
# ---------------------------------------------------------------------------

_VARIANT_SCRIPT = """
import hashlib, torch, pni_fast._ext as e
assert e.load(), e.status_message()
z = torch.ops.pni_fast.noise(torch.empty(100_003), 2**40 + 5, 2**32 - 77)
g = torch.ops.pni_fast.perturb_alpha_grad(torch.ones(3, 4099), torch.ones(4099), torch.tensor(1.0), 3, 1, 1)
x = torch.linspace(-70000, 70000, 5003).half()  # includes +-inf after the cast
h = torch.ops.pni_fast.perturb(x, torch.tensor(0.3).half(), torch.tensor(2.0), 9, 0, 1)
h = torch.cat([h, torch.ops.pni_fast.sigma(x[1:-1]).half().reshape(1)])
print(hashlib.sha256(z.numpy().tobytes() + g.numpy().tobytes() + h.view(torch.int16).numpy().tobytes()).hexdigest())
"""


def test_simd_variants_give_identical_bits():
    import os
    import subprocess
    import sys

    namespace: dict = {}
    exec(_VARIANT_SCRIPT.replace("print(", "digest = ("), namespace)  # this process: auto-chosen variant
    digests = {"auto": namespace["digest"]}
    for isa in ("generic", "avx2"):
        env = dict(os.environ, PNI_FAST_CPU_ISA=isa, PNI_FAST_NO_JIT="1")
        res = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        digests[isa] = res.stdout.strip()
    assert len(set(digests.values())) == 1, digests


# ---------------------------------------------------------------------------
# sigma (fused unbiased std)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 3, 1000, 70_001])
def test_sigma_matches_float64_std(dtype, n):
    x = (torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 3 + 100).to(dtype)
    got = ops.sigma(x)
    assert got.shape == () and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exp = x.double().std().item()
    assert abs(got.item() - exp) <= 1e-6 * exp


def test_sigma_edge_cases():
    assert ops.sigma(torch.ones(1)).item() == 0.0
    assert ops.sigma(torch.empty(0, 4)).item() == 0.0
    assert ops.sigma(torch.full((100,), 2.5)).item() == 0.0
    assert torch.isnan(ops.sigma(torch.tensor([1.0, float("nan"), 2.0])))
    assert torch.isnan(ops.sigma(torch.tensor([1.0, float("inf")])))
    x = torch.randn(64, 48)
    assert ops.sigma(x.t()).item() == ops.sigma(x.t().contiguous()).item()
    assert ops.sigma(torch.empty(5, 7, device="meta")).shape == ()
    with pytest.raises(RuntimeError, match="v must be float32"):
        ops.sigma(torch.ones(4, dtype=torch.int64))


def test_sigma_is_deterministic_across_threads():
    x = torch.randn(300_000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.sigma(x)
        torch.set_num_threads(2)
        b = ops.sigma(x)
    finally:
        torch.set_num_threads(before)
    assert a.item() == b.item()


def test_float16_path_matches_fp32_formula_bitwise():
    # F16C conversions (when present) must round like c10::Half: compare with the
    # fp32 formula rounded by torch
    v = torch.randn(5000, dtype=torch.float16) * 100
    v[7], v[300] = float("inf"), float("nan")
    for alpha in (torch.tensor(0.25, dtype=torch.float16), torch.rand(5000, dtype=torch.float16)):
        sigma = torch.tensor(1.7)
        out = ops.perturb(v, alpha, sigma, 5, 3, 1)
        z = ops.noise(v, 5, 3)
        ref = (v.float() + (alpha.float() * sigma) * z).half()
        assert torch.equal(out.view(torch.int16)[torch.isfinite(ref)], ref.view(torch.int16)[torch.isfinite(ref)])
        assert torch.isinf(out[7]) and torch.isnan(out[300])


# ---------------------------------------------------------------------------
# C++ autograd (csrc/autograd.cpp)
# ---------------------------------------------------------------------------


def test_cpp_autograd_single():
    v, alpha = make((6, 4, 3, 3), (6, 1, 1, 1), torch.float64)
    v.requires_grad_(True)
    alpha.requires_grad_(True)
    sigma = v.detach().std()
    assert torch.autograd.gradcheck(lambda vv, aa: ops.perturb(vv, aa, sigma, 5, 2, 36), (v, alpha))
    out = ops.perturb(v, alpha, sigma, 5, 2, 36)
    assert "Cpp" in type(out.grad_fn).__name__  # the C++ node, no Python on the hot path
    g = torch.randn_like(out)
    gv, ga = torch.autograd.grad(out, [v, alpha], g)
    assert torch.equal(gv, g)
    assert torch.equal(ga, ops.perturb_alpha_grad(g, alpha.detach(), sigma, 5, 2, 36))
    # only v requires grad: alpha's gradient is never computed
    out = ops.perturb(v, alpha.detach(), sigma, 5, 2, 36)
    (gv2,) = torch.autograd.grad(out, [v], g)
    assert torch.equal(gv2, g)


def test_cpp_autograd_multi():
    v1, a1 = make((8, 3, 3, 3), (8, 1, 1, 1), torch.float64, gen_seed=1)
    v2, a2 = make((10, 7), (), torch.float64, gen_seed=2)
    for t in (v1, a1, v2, a2):
        t.requires_grad_(True)
    s1, s2 = v1.detach().std(), v2.detach().std()

    def f(x1, b1, x2, b2):
        return tuple(ops.perturb_multi([x1, x2], [b1, b2], [s1, s2], 9, [0, 100], [27, 1]))

    assert torch.autograd.gradcheck(f, (v1, a1, v2, a2))
    outs = f(v1, a1, v2, a2)
    # the second output unused: its alpha gets a zero gradient, v2 none
    g1 = torch.randn_like(outs[0])
    ga1, ga2 = torch.autograd.grad(outs[0], [a1, a2], g1, allow_unused=True, materialize_grads=True)
    assert torch.equal(ga1, ops.perturb_alpha_grad(g1, a1.detach(), s1, 9, 0, 27))
    assert ga2.item() == 0.0
