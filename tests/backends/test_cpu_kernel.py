"""What only the C++ CPU kernels promise, beyond the contract every backend meets
(tests/test_kernels_*.py, parametrized by backend): their argument checks and messages, bit-level
agreement with torch's float32 formula, determinism across thread counts, the SIMD variants, the
fused sigma, and rng_state / alpha-dtype errors. scripts/sanitize.sh runs this file (and the
contract tests for the cpu backend) under ASan + UBSan.
"""

from __future__ import annotations

import math

import pytest
import torch

from pni_fast import _ext

from oracle import CASES, alpha_index, inputs

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension unavailable: {_ext.status_message()}")

ops = torch.ops.pni_fast


# ---------------------------------------------------------------------------
# bit-level results and determinism
# ---------------------------------------------------------------------------


def test_perturb_equals_v_plus_scaled_noise_exactly():
    v, _, alpha, _ = inputs((1000,), ())
    sigma = torch.tensor(0.5)
    out = ops.perturb(v, alpha, sigma, 5, 6, 1)
    z = ops.noise(v, 5, 6)
    assert torch.equal(out, v + (alpha * sigma) * z)


@pytest.mark.parametrize(
    "case", ["layerwise-huge", "rows-multi-item", "columns-tiles", "act-per-feature", "columns-tiles-inner2"]
)
def test_determinism_across_runs_and_threads(case):
    shape, alpha_shape, inner = CASES[case]
    _, grad, alpha, _ = inputs(shape, alpha_shape, seed=3)
    sigma = torch.tensor(1.3)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(
                (
                    ops.perturb(grad, alpha, sigma, 11, 0, inner),
                    ops.perturb_alpha_grad(grad, alpha, sigma, 11, 0, inner),
                )
            )
    finally:
        torch.set_num_threads(before)
    for fwd, bwd in results[1:]:
        assert torch.equal(fwd, results[0][0])
        assert torch.equal(bwd.view(-1).view(torch.int32), results[0][1].view(-1).view(torch.int32))


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["layerwise", "conv-channelwise", "elementwise", "act-per-feature"])
def test_float32_alpha_with_half_tensors_bitwise(dtype, case):
    """float32 alpha with 16-bit v: float32 math rounded once, like torch's formula, bit for bit; a
    16-bit alpha with the same values gives the float32 gradient rounded to 16 bits."""
    shape, alpha_shape, inner = CASES[case]
    v, _, _, _ = inputs(shape, alpha_shape, dtype)
    alpha = 0.1 + torch.rand(alpha_shape, generator=torch.Generator().manual_seed(4))  # float32, not 16-bit exact
    sigma = torch.tensor(0.7)
    out = ops.perturb(v, alpha, sigma, 5, 3, inner)
    assert out.dtype == dtype
    z = ops.noise(v, 5, 3)
    a = alpha.reshape(-1)[alpha_index(v.numel(), alpha.numel(), inner)].reshape(v.shape)
    ref = (v.float() + (a * sigma) * z).to(dtype)  # float32 math, one rounding
    assert torch.equal(out, ref)
    g = ops.perturb_alpha_grad(v, alpha, sigma, 5, 3, inner)
    assert g.dtype == torch.float32 and g.shape == alpha.shape
    g16 = ops.perturb_alpha_grad(v, alpha.to(dtype), sigma, 5, 3, inner)
    assert g16.dtype == dtype and torch.equal(g16, g.to(dtype))


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


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
        ops.perturb_multi([v, v], [a], [s, s], [1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        ops.perturb_alpha_grad_multi([v], [a], [s], [1], [0, 1], [1])
    with pytest.raises(TypeError, match=r"vs\[1\]: alpha must have dtype"):
        ops.perturb_multi([v, v], [a, a.double()], [s, s], [1], [0, 2], [1, 1])
    with pytest.raises(ValueError, match=r"grads\[0\]: offset must be >= 0"):
        ops.perturb_alpha_grad_multi([v], [a], [s], [1], [-1], [1])


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
            ops.perturb_multi([v], [a], [s], [0], [5], [1], state)
        else:
            getattr(ops, op)(v, a, s, 0, 5, 1, state)


@pytest.mark.parametrize(
    "v_dtype,alpha_dtype,match",
    [
        (
            torch.float16,
            torch.float64,
            r"alpha must have dtype torch.float16 \(the dtype of v\) or torch.float32, got torch.float64",
        ),
        (
            torch.bfloat16,
            torch.float16,
            r"alpha must have dtype torch.bfloat16 \(the dtype of v\) or torch.float32, got torch.float16",
        ),
        (torch.float64, torch.float32, r"alpha must have dtype torch.float64 \(the dtype of v\), got torch.float32"),
        (torch.float32, torch.float16, r"alpha must have dtype torch.float32 \(the dtype of v\), got torch.float16"),
    ],
)
def test_alpha_dtype_checks(v_dtype, alpha_dtype, match):
    for op, name in (("perturb", "v"), ("perturb_alpha_grad", "grad")):
        with pytest.raises(TypeError, match=match.replace("of v", f"of {name}")):
            _call(v=torch.randn(4, 3).to(v_dtype), alpha=torch.tensor(0.25, dtype=alpha_dtype), op=op)


def test_inner_zero_only_for_zero_size():
    with pytest.raises(ValueError, match=r"inner must be >= 1 \(0 only for a zero-size v\), got 0"):
        _call(inner=0)
    with pytest.raises(ValueError, match=r"alpha must have at least one element \(unless grad is zero-size\)"):
        _call(alpha=torch.empty(0), op="perturb_alpha_grad")


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


@pytest.mark.slow
def test_simd_variants_give_identical_bits():
    import os
    import subprocess
    import sys

    namespace: dict = {}
    exec(_VARIANT_SCRIPT.replace("print(", "digest = ("), namespace)  # this process: auto-chosen variant
    digests = {"auto": namespace["digest"]}
    for isa in ("generic", "avx2", "avx512"):
        env = dict(os.environ, PNI_FAST_CPU_ISA=isa, PNI_FAST_NO_JIT="1")
        res = subprocess.run(
            [sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True, timeout=120
        )
        if res.returncode != 0 and f"PNI_FAST_CPU_ISA={isa}, but this CPU lacks" in res.stderr:
            continue  # a variant this CPU cannot run (the error is the documented behaviour)
        assert res.returncode == 0, res.stderr[-2000:]
        digests[isa] = res.stdout.strip()
    assert "generic" in digests
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
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
        shift = (
            scale * 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=gen)) * float(torch.randn(1, generator=gen))
        )
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
