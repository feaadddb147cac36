"""The C++ CPU kernels (torch.ops.pni_fast.*) against the independent numpy oracle.

Philox words and uniforms must match bit for bit, normals within 2e-6 (design.md
section 3); forward and alpha gradient are checked against float64 numpy math built
from the oracle's noise.
"""
from __future__ import annotations

import math

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
        (dict(alpha=torch.tensor(0.25, dtype=torch.float64)), "alpha must have dtype"),
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
    with pytest.raises((TypeError, ValueError), match=match):
        _call(op=op, **kwargs)


def test_argument_checks_names_grad():
    with pytest.raises(TypeError, match="grad must be float32"):
        _call(v=torch.ones(3, dtype=torch.int64), alpha=torch.tensor(1), op="perturb_alpha_grad")


@pytest.mark.parametrize("op", ["noise", "rng_words", "rng_uniform"])
def test_rng_op_checks(op):
    with pytest.raises(ValueError, match="seed must be"):
        getattr(ops, op)(torch.empty(3), -2, 0)
    with pytest.raises(ValueError, match="offset must be"):
        getattr(ops, op)(torch.empty(3), 2, -1)
    with pytest.raises(ValueError, match="must be < 2"):
        getattr(ops, op)(torch.empty(9), 2, 2**63 - 2)
    assert getattr(ops, op)(torch.empty(4), 2, 2**63 - 2).numel() == 4  # last counter 2^63 - 2 is fine


def test_multi_checks():
    v = torch.randn(5)
    a, s = torch.tensor(0.25), torch.tensor(1.0)
    with pytest.raises(ValueError, match="same length"):
        ops.perturb_multi([v, v], [a], [s, s], 1, [0, 0], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        ops.perturb_alpha_grad_multi([v], [a], [s], 1, [0, 1], [1])
    with pytest.raises(TypeError, match=r"vs\[1\]: alpha must have dtype"):
        ops.perturb_multi([v, v], [a, a.double()], [s, s], 1, [0, 2], [1, 1])
    with pytest.raises(ValueError, match=r"grads\[0\]: offset must be >= 0"):
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
    for isa in ("generic", "avx2", "avx512"):
        env = dict(os.environ, PNI_FAST_CPU_ISA=isa, PNI_FAST_NO_JIT="1")
        res = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0 and f"PNI_FAST_CPU_ISA={isa}, but this CPU lacks" in res.stderr:
            continue  # a variant this CPU cannot run (the error is the documented behaviour)
        assert res.returncode == 0, res.stderr[-2000:]
        digests[isa] = res.stdout.strip()
    assert "generic" in digests
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("value", ["bogus", "AVX2", "sse"])
def test_bad_cpu_isa_is_an_error_naming_the_choices(value):
    import os
    import subprocess
    import sys

    script = "import torch, pni_fast._ext as e; assert e.load(); torch.ops.pni_fast.noise(torch.empty(3), 1, 0)"
    env = dict(os.environ, PNI_FAST_CPU_ISA=value, PNI_FAST_NO_JIT="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert f"PNI_FAST_CPU_ISA must be 'auto', 'generic', 'avx2' or 'avx512' (or unset), got '{value}'" in res.stderr


# ---------------------------------------------------------------------------
# sigma (fused unbiased std)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 3, 1000, 70_001])
def test_sigma_matches_float64_std(dtype, n):
    x = (torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 3 + 100).to(dtype)
    got = ops.sigma(x)
    assert got.shape == () and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exp = x.double().std()
    if dtype == torch.float64:
        assert abs(got.item() - exp.item()) <= 1e-14 * exp.item()
    else:  # float64 two-pass rounded once to float32
        assert got.item() == exp.float().item()


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


def _two_pass_std(x: torch.Tensor) -> torch.Tensor:
    """The definition of sigma for float32/float16/bfloat16: float64 two-pass, rounded once."""
    d = x.double().reshape(-1)
    return (((d - d.mean()) ** 2).sum() / (d.numel() - 1)).sqrt().float()


def test_sigma_agrees_with_float64_two_pass_on_random_inputs():
    gen = torch.Generator().manual_seed(7)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    checked = 0
    for i in range(500):
        n = int(torch.randint(2, 3000, (1,), generator=gen))
        dtype = dtypes[i % 3]
        top = 4 if dtype == torch.float16 else 30  # float16 stays finite
        scale = 10.0 ** float(torch.empty(1).uniform_(-top, top, generator=gen))
        shift = scale * 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=gen)) * float(torch.randn(1, generator=gen))
        x = (torch.randn(n, dtype=torch.float64, generator=gen) * scale + shift).to(dtype)
        if not torch.isfinite(x).all():
            continue
        got, exp = ops.sigma(x), _two_pass_std(x)
        assert got.item() == exp.item(), (i, n, dtype, scale, shift, got.item(), exp.item())
        assert abs(got.item() - x.double().std().item()) <= 1e-6 * x.double().std().item()
        checked += 1
    assert checked > 450


def test_sigma_does_not_overflow_or_underflow():
    gen = torch.Generator().manual_seed(8)
    # float32 values ~1e30: squares overflow float32 but not the float64 accumulation
    x = (torch.randn(5000, dtype=torch.float64, generator=gen) * 1e30).float()
    assert torch.isinf((x - x.mean()).pow(2).sum())  # the fp32 trap this guards against
    assert ops.sigma(x).item() == _two_pass_std(x).item()
    # float64 values ~1e200 (squares overflow float64) and ~1e-200 (squares underflow)
    for magnitude, k in ((1e200, 664), (1e-200, -664)):
        y = torch.randn(4999, dtype=torch.float64, generator=gen) * magnitude + 3 * magnitude
        exp = (y * 2.0**-k).std().item() * 2.0**k
        assert math.isfinite(exp) and exp > 0
        assert abs(ops.sigma(y).item() - exp) <= 1e-14 * exp, (magnitude, ops.sigma(y).item(), exp)
    big = torch.tensor([1.7e308, -1.7e308, 0.0, 0.0], dtype=torch.float64)  # (x - mean)^2 overflows
    exp = 1.7e308 * math.sqrt(2 / 3)  # mean 0, deviations +-1.7e308 and 0: sqrt(2 * 1.7e308^2 / 3)
    assert math.isfinite(exp) and abs(ops.sigma(big).item() - exp) <= 1e-14 * exp
    # the same with flush-to-zero / denormals-are-zero on (another test or the user may set it)
    if torch.set_flush_denormal(True):
        try:
            assert abs(ops.sigma(big).item() - exp) <= 1e-14 * exp
        finally:
            torch.set_flush_denormal(False)
    tiny = torch.tensor([3e-310, 1e-310, 2e-310, 5e-310], dtype=torch.float64)  # subnormal inputs
    assert tiny.std().item() == 0.0  # unscaled float64: every square underflows
    exp = (tiny * 2.0**1022).std().item() / 2.0**1022
    assert exp > 1e-310 and abs(ops.sigma(tiny).item() - exp) <= 1e-12 * exp
    assert torch.isnan(ops.sigma(torch.tensor([1.0, float("inf"), 2.0], dtype=torch.float64)))
    assert ops.sigma(torch.zeros(10, dtype=torch.float64)).item() == 0.0


# ---------------------------------------------------------------------------
# rng_state (docs/ops.md): seed = rng_state[0], counter offset = rng_state[1] + offset
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["noise", "rng_words", "rng_uniform"])
def test_rng_state_replaces_seed_and_adds_base(op):
    like = torch.empty(1001)
    seed, base = 2**40 + 7, 2**32 + 3
    state = torch.tensor([seed, base])
    before = state.clone()
    got = getattr(ops, op)(like, 0, 5, state)
    assert torch.equal(got, getattr(ops, op)(like, seed, base + 5))
    assert torch.equal(got, getattr(ops, op)(like, 999, 5, rng_state=state))  # the seed argument is ignored
    assert torch.equal(state, before)  # never written
    if op == "rng_words":
        np.testing.assert_array_equal(got.numpy().view(np.uint32), oracle.words(seed, base + 5, 1001))


def test_rng_state_perturb_and_alpha_grad():
    shape, alpha_shape, inner = CASES["weight_channelwise"]
    v, alpha = make(shape, alpha_shape)
    sigma = v.std()
    seed, base = 12345, 777
    state = torch.tensor([seed, base])
    out = ops.perturb(v, alpha, sigma, 0, 9, inner, state)
    np.testing.assert_allclose(out.reshape(-1).double().numpy(),
                               expected_forward(v, alpha, sigma.item(), seed, base + 9, inner), rtol=1e-6, atol=1e-5)
    assert torch.equal(out, ops.perturb(v, alpha, sigma, seed, base + 9, inner))
    g = ops.perturb_alpha_grad(v, alpha, sigma, 0, 9, inner, rng_state=state)
    assert torch.equal(g, ops.perturb_alpha_grad(v, alpha, sigma, seed, base + 9, inner))
    vs, alphas, sigmas = [v, v[:3]], [alpha, alpha[:3]], [sigma, sigma]
    outs = ops.perturb_multi(vs, alphas, sigmas, 0, [0, 500], [inner, inner], state)
    grads = ops.perturb_alpha_grad_multi(vs, alphas, sigmas, 0, [0, 500], [inner, inner], state)
    for i, off in enumerate([0, 500]):
        assert torch.equal(outs[i], ops.perturb(vs[i], alphas[i], sigmas[i], seed, base + off, inner))
        assert torch.equal(grads[i], ops.perturb_alpha_grad(vs[i], alphas[i], sigmas[i], seed, base + off, inner))
    assert torch.equal(state, torch.tensor([seed, base]))


@pytest.mark.parametrize(
    "state,match",
    [
        (torch.tensor([1, 2], dtype=torch.int32), "rng_state must be an int64 tensor"),
        (torch.tensor([1.0, 2.0]), "rng_state must be an int64 tensor"),
        (torch.tensor([1, 2, 3]), r"rng_state must have shape \[2\]"),
        (torch.tensor([[1, 2]]), r"rng_state must have shape \[2\]"),
        (torch.tensor([1, 0, 2, 0])[::2], "rng_state must be contiguous"),
        (torch.tensor([-1, 0]), r"rng_state\[0\] \(the seed\) must be in \[0, 2\^63\)"),
        (torch.tensor([1, -4]), r"rng_state\[1\] \(the counter base\) must be >= 0"),
        (torch.tensor([1, 2**63 - 3]), r"rng_state\[1\] \+ offset"),
    ],
)
@pytest.mark.parametrize("op", ["noise", "rng_words", "perturb", "perturb_alpha_grad", "perturb_multi"])
def test_rng_state_checks(op, state, match):
    v = torch.randn(40)
    a, s = torch.tensor(0.25), torch.tensor(1.0)
    # TypeError / ValueError (csrc/checks.h); RuntimeError from csrc/cpu/rng_state.h's counter check
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        if op in ("noise", "rng_words"):
            getattr(ops, op)(v, 0, 5, state)
        elif op == "perturb_multi":
            ops.perturb_multi([v], [a], [s], 0, [5], [1], state)
        else:
            getattr(ops, op)(v, a, s, 0, 5, 1, state)


# ---------------------------------------------------------------------------
# float32 alpha with float16 / bfloat16 tensors (AMP)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["layerwise", "weight_channelwise", "elementwise", "act_per_feature"])
def test_float32_alpha_with_half_tensors(dtype, case):
    shape, alpha_shape, inner = CASES[case]
    v, _ = make(shape, alpha_shape, dtype)
    alpha = 0.1 + torch.rand(alpha_shape, generator=torch.Generator().manual_seed(4))  # float32, not 16-bit exact
    sigma = torch.tensor(0.7)
    out = ops.perturb(v, alpha, sigma, 5, 3, inner)
    assert out.dtype == dtype
    z = ops.noise(v, 5, 3)
    a = alpha.reshape(-1)[torch.from_numpy(alpha_index(v.numel(), alpha.numel(), inner))].reshape(v.shape)
    ref = (v.float() + (a * sigma) * z).to(dtype)  # float32 math, one rounding
    assert torch.equal(out, ref)
    g = ops.perturb_alpha_grad(v, alpha, sigma, 5, 3, inner)
    assert g.dtype == torch.float32 and g.shape == alpha.shape
    exp, scale = expected_alpha_grad(v, alpha, 0.7, 5, 3, inner)
    assert np.all(np.abs(g.double().numpy() - exp) <= 1e-5 * scale + 1e-6)
    # a 16-bit alpha with the same values gives the same gradient rounded to 16 bits
    g16 = ops.perturb_alpha_grad(v, alpha.to(dtype), sigma, 5, 3, inner)
    assert g16.dtype == dtype and torch.equal(g16, g.to(dtype))


def test_float32_alpha_grad_of_float16_does_not_overflow():
    n = 4_000_000
    z = ops.noise(torch.empty(n), 3, 11)
    g = z.half()  # sum(g * z) ~ n: the exact alpha gradient is far above float16's 65504
    sigma = torch.tensor(1.25)
    exp = (g.double() * z.double()).sum().item() * 1.25
    assert exp > 65504 * 10
    got = ops.perturb_alpha_grad(g, torch.tensor(0.25), sigma, 3, 11, 1)
    assert got.dtype == torch.float32 and math.isfinite(got.item())
    assert abs(got.item() - exp) <= 1e-5 * exp
    (got_multi,) = ops.perturb_alpha_grad_multi([g], [torch.tensor(0.25)], [sigma], 3, [11], [1])
    assert torch.equal(got_multi, got)


@pytest.mark.parametrize(
    "v_dtype,alpha_dtype,match",
    [
        (torch.float16, torch.float64,
         r"alpha must have dtype torch.float16 \(the dtype of v\) or torch.float32, got torch.float64"),
        (torch.bfloat16, torch.float16,
         r"alpha must have dtype torch.bfloat16 \(the dtype of v\) or torch.float32, got torch.float16"),
        (torch.float64, torch.float32, r"alpha must have dtype torch.float64 \(the dtype of v\), got torch.float32"),
        (torch.float32, torch.float16, r"alpha must have dtype torch.float32 \(the dtype of v\), got torch.float16"),
    ],
)
def test_alpha_dtype_checks(v_dtype, alpha_dtype, match):
    for op, name in (("perturb", "v"), ("perturb_alpha_grad", "grad")):
        with pytest.raises(TypeError, match=match.replace("of v", f"of {name}")):
            _call(v=torch.randn(4, 3).to(v_dtype), alpha=torch.tensor(0.25, dtype=alpha_dtype), op=op)


# ---------------------------------------------------------------------------
# zero-size tensors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [0, 1])
@pytest.mark.parametrize(
    "shape,alpha_shape", [((4, 0), (4, 1)), ((4, 0), ()), ((4, 0), (4, 0)), ((0, 3, 3, 3), (0, 1, 1, 1))]
)
def test_zero_size_tensors_with_layer_alphas(shape, alpha_shape, inner):
    v = torch.empty(shape, dtype=torch.float16)
    for alpha in (torch.full(alpha_shape, 0.25), torch.full(alpha_shape, 0.25, dtype=torch.float16)):
        s = torch.tensor(1.0)
        out = ops.perturb(v, alpha, s, 1, 0, inner)
        assert out.shape == v.shape and out.dtype == v.dtype
        g = ops.perturb_alpha_grad(v, alpha, s, 1, 0, inner, torch.tensor([3, 4]))
        assert g.shape == alpha.shape and g.dtype == alpha.dtype and not g.any()
        (g2,) = ops.perturb_alpha_grad_multi([v], [alpha], [s], 1, [0], [inner])
        assert torch.equal(g2, g)
        (o2,) = ops.perturb_multi([v], [alpha], [s], 1, [0], [inner])
        assert o2.shape == v.shape


def test_inner_zero_only_for_zero_size():
    with pytest.raises(ValueError, match=r"inner must be >= 1 \(0 only for a zero-size v\), got 0"):
        _call(inner=0)
    with pytest.raises(ValueError, match=r"alpha must have at least one element \(unless grad is zero-size\)"):
        _call(alpha=torch.empty(0), op="perturb_alpha_grad")
