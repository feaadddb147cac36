"""Contract tolerances shared by tests/test_cuda.py and tests/test_triton.py.

design.md section 3 / docs/ops.md: Philox words and uniforms are bit-exact on every backend; z is
within ``Z_TOL = 2e-6`` of the numpy oracle (the last-ulp behaviour of each platform's
log/cos/sin); the arithmetic on z runs in float32 (float64 for float64) and is rounded once to
the output dtype; alpha gradients are accumulated in float32 (float64) in an order of the
backend's choosing. ``out_bound``/``grad_bound`` are element-wise bounds a correct kernel cannot
exceed, derived from those rules and never from measured values:

* against float64 math on the oracle's z, allow ``z_tol = Z_TOL`` for the noise plus rounding;
* against float64 math on the backend's own z (its ``noise`` op, same seed and offset), only
  rounding remains (``z_tol = 0``).

Alpha gradients are bounded relative to ``sigma * sum |g z|`` (the condition of the sum), which a
reduction of any order meets while a wrong, missing or shifted noise value does not.
"""
from __future__ import annotations

import math

import torch

Z_TOL = 2e-6  # design.md section 3: |z - oracle| <= 2e-6 on every backend
# unit roundoff of each dtype: half an ulp, relative
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# absolute rounding floor near zero (subnormal spacing)
TINY = {torch.float64: 1e-300, torch.float32: 1e-38, torch.float16: 2.0**-24, torch.bfloat16: 1e-38}
# relative error of a blocked/tree sum, against sigma * sum |g z|: a few hundred roundings deep
SUM_REL = {torch.float64: 1e-12, torch.float32: 3e-5}
SIGMA_REL = {torch.float64: 1e-12, torch.float32: 1e-5}  # a device std against the float64 std


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes in for values of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_index(numel: int, n_alpha: int, inner: int) -> torch.Tensor:
    """The alpha index of every element: ``(i // inner) % n_alpha``."""
    return (torch.arange(numel) // inner) % n_alpha


def flat64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().reshape(-1).cpu()


def expected_out(v, alpha, sigma, inner, z):
    """(expected, per-element alpha) for perturb in float64."""
    n = v.numel()
    a = flat64(alpha)[alpha_index(n, alpha.numel(), inner)]
    return flat64(v) + a * float(sigma) * z, a


def grad_terms(g, alpha, sigma, inner, z):
    """(sigma * sum g z, sigma * sum |g z|, sigma * sum |g|) per alpha index, float64."""
    n, k = g.numel(), alpha.numel()
    idx = alpha_index(n, k, inner)
    g64 = flat64(g)
    sums = [torch.zeros(k, dtype=torch.float64).index_add_(0, idx, t) * float(sigma)
            for t in (g64 * z, (g64 * z).abs(), g64.abs())]
    return tuple(sums)


def assert_within(got, expected, bound, what: str) -> None:
    """Element-wise ``|got - expected| <= bound`` with a readable report of the worst element."""
    got = flat64(got)
    expected, bound = expected.reshape(-1), bound.reshape(-1)
    assert got.shape == expected.shape, f"{what}: {got.shape} elements, expected {expected.shape}"
    err = (got - expected).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = int(torch.argmax(torch.where(bad, err / bound, torch.zeros_like(err))))
        if not math.isfinite(err[i]):
            i = int(torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} elements out of bounds; worst at {i}: got {got[i]:.9g}, "
            f"expected {expected[i]:.9g}, |diff| {err[i]:.3g} > bound {bound[i]:.3g}"
        )


class Bounds:
    """out/grad bounds and checks. ``bf16_truncates``: the kernels under test may convert to
    bfloat16 by truncation (the Triton interpreter does; GPUs and the C++ kernels round to
    nearest), which doubles the final rounding error of bfloat16 results."""

    def __init__(self, bf16_truncates: bool = False):
        self.bf16_truncates = bf16_truncates

    def unit_out(self, dtype: torch.dtype) -> float:
        """Relative error of the final rounding to ``dtype``."""
        if self.bf16_truncates and dtype == torch.bfloat16:
            return 2 * UNIT[dtype]
        return UNIT[dtype]

    def out_bound(self, v, a, sigma, z, dtype, z_tol, sigma_rel=0.0):
        """Largest ``|out - (v + a*sigma*z)|`` of a correct kernel, element-wise (all float64 CPU tensors).

        ``a`` is alpha per element; ``z`` the noise the expectation uses, within ``z_tol`` of the
        kernel's; ``sigma_rel`` the relative error of the kernel's sigma. The math runs in
        ``math_dtype(dtype)`` (a few roundings) and the result is rounded once to ``dtype``.
        """
        scale = (a * sigma).abs()
        noise = scale * z.abs()
        expected = v + a * sigma * z
        u_out = self.unit_out(dtype) if dtype in (torch.float16, torch.bfloat16) else 0.0
        return (scale * z_tol + noise * sigma_rel + 4 * UNIT[math_dtype(dtype)] * (v.abs() + noise)
                + 1.01 * u_out * expected.abs() + TINY[dtype])

    def grad_bound(self, expected, abs_gz, abs_g, acc_dtype, out_dtype, z_tol, sigma_rel=0.0):
        """Largest ``|grad - expected|`` of a correct alpha-gradient kernel (see grad_terms)."""
        return (z_tol * abs_g + SUM_REL[math_dtype(acc_dtype)] * abs_gz
                + (sigma_rel + 1.01 * self.unit_out(out_dtype)) * expected.abs() + TINY[out_dtype])

    def check_perturb(self, out, v, alpha, sigma, inner, z_oracle, z_own=None, sigma_rel=0.0, what="out"):
        """out against the oracle's z (within Z_TOL) and, if given, the backend's own z (rounding only)."""
        for z, tol, name in ((z_oracle, Z_TOL, "oracle z"), (z_own, 0.0, "own z")):
            if z is not None:
                exp, a = expected_out(v, alpha, sigma, inner, z)
                bound = self.out_bound(flat64(v), a, float(sigma), z, out.dtype, tol, sigma_rel)
                assert_within(out, exp, bound, f"{what} vs {name}")

    def check_grad(self, grad, g, alpha, sigma, inner, z_oracle, z_own=None, sigma_rel=0.0, what="alpha grad"):
        """alpha grad against the oracle's z (within Z_TOL) and, if given, the backend's own z."""
        for z, tol, name in ((z_oracle, Z_TOL, "oracle z"), (z_own, 0.0, "own z")):
            if z is not None:
                exp, abs_gz, abs_g = grad_terms(g, alpha, sigma, inner, z)
                bound = self.grad_bound(exp, abs_gz, abs_g, g.dtype, grad.dtype, tol, sigma_rel)
                assert_within(grad, exp, bound, f"{what} vs {name}")
