"""The one test oracle: what every backend must compute, from numpy and float64 math only.

It shares no code with pni_fast, so a bug there cannot hide in the expectation:

* the RNG contract (design.md section 3) in numpy: Random123 philox4x32-10, the word -> uniform map
  and fp32 Box-Muller, pinned by Random123's published known-answer vectors (``KNOWN_ANSWERS``);
* the op contract (docs/ops.md) in float64: the alpha broadcast rule, perturb and the alpha gradient;
* the element-wise bounds a correct kernel cannot exceed, derived from the contract, never measured:
  z within ``Z_TOL = 2e-6`` of this oracle (the last-ulp behaviour of each platform's log/cos/sin),
  math in float32 (float64 for float64) rounded once to the output dtype, alpha gradients summed in
  float32 (float64) in any order. Against the oracle's z the noise allowance is ``Z_TOL``; against a
  backend's own z (its ``noise`` op, same seed and offset) only rounding remains. Alpha gradients are
  bounded relative to ``sigma * sum |g z|`` (the condition of the sum): a reduction of any order meets
  it, a wrong, missing or shifted noise value does not;
* the case table (every alpha mode at sizes around the kernels' block and tile edges) and inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# ---------------------------------------------------------------------------
# The RNG contract in numpy
# ---------------------------------------------------------------------------

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_rounds(c0, c1, c2, c3, k0, k1, rounds: int = 10) -> np.ndarray:
    """Random123 philox4x32 on uint64 arrays holding 32-bit values; returns (n, 4) uint32."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in (c0, c1, c2, c3))
    k0 = np.uint64(int(k0) & 0xFFFFFFFF)
    k1 = np.uint64(int(k1) & 0xFFFFFFFF)
    for _ in range(rounds):
        p0 = _M0 * c0  # < 2^64: exact in uint64
        p1 = _M1 * c2
        n0 = (p1 >> _SHIFT32) ^ c1 ^ k0
        n1 = p1 & _MASK32
        n2 = (p0 >> _SHIFT32) ^ c3 ^ k1
        n3 = p0 & _MASK32
        c0, c1, c2, c3 = n0, n1, n2, n3
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def philox4x32_10(counters: np.ndarray, seed: int) -> np.ndarray:
    """Philox words for 64-bit counters (c0 = low, c1 = high, c2 = c3 = 0) under a 63-bit seed."""
    ctr = np.asarray(counters, dtype=np.uint64)
    zero = np.zeros_like(ctr)
    return philox4x32_rounds(ctr & _MASK32, ctr >> _SHIFT32, zero, zero, seed & 0xFFFFFFFF, seed >> 32)


def words(seed: int, offset: int, numel: int) -> np.ndarray:
    """Flat uint32 words in element order: element i takes word i % 4 of counter offset + i // 4."""
    nq = -(-numel // 4)
    ctr = np.uint64(offset) + np.arange(nq, dtype=np.uint64)
    return philox4x32_10(ctr, seed).reshape(-1)


def uniform(w: np.ndarray) -> np.ndarray:
    """The contract's word -> float32 map: int32 view, negative values complemented, times 0x2FFFFFFF."""
    v = np.asarray(w, dtype=np.uint32).view(np.int32)
    v = np.where(v < 0, ~v, v)
    return v.astype(np.float32) * np.float32(4.6566127342e-10)


def normal_from_words(w: np.ndarray) -> np.ndarray:
    """fp32 Box-Muller on pairs (w0, w1) and (w2, w3) of each quad."""
    u = uniform(w).reshape(-1, 2, 2)
    u1 = np.maximum(np.float32(1e-7), u[:, :, 0])
    u2 = u[:, :, 1]
    with np.errstate(all="ignore"):
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
    t = np.float32(6.2831855) * u2
    z = np.stack([r * np.cos(t), r * np.sin(t)], axis=-1)
    return z.astype(np.float32).reshape(-1)


def normal(seed: int, offset: int, numel: int) -> np.ndarray:
    """z for a tensor of ``numel`` elements: what every backend must produce (within Z_TOL)."""
    return normal_from_words(words(seed, offset, numel))[:numel]


def normal_at(seed: int, offset: int, idx) -> torch.Tensor:
    """float64 z of the elements ``idx`` of a tensor (for tensors too big for :func:`normal`)."""
    idx = np.asarray(idx, dtype=np.int64)
    w = philox4x32_10(np.uint64(offset) + (idx // 4).astype(np.uint64), seed)
    z = normal_from_words(w.reshape(-1)).reshape(-1, 4)
    return torch.from_numpy(z[np.arange(idx.size), idx % 4].astype(np.float64))


def z64(numel: int, seed: int, offset: int) -> torch.Tensor:
    """:func:`normal` as a float64 CPU tensor (the expectations' noise)."""
    return torch.from_numpy(normal(seed, offset, numel)).to(torch.float64)


# Random123 kat_vectors, philox4x32_10: (counter c0..c3, key k0..k1) -> output words.
KNOWN_ANSWERS = [
    (
        (0x00000000, 0x00000000, 0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# ---------------------------------------------------------------------------
# The op contract in float64
# ---------------------------------------------------------------------------

Z_TOL = 2e-6  # design.md section 3: |z - oracle| <= 2e-6 on every backend
# unit roundoff of each dtype: half an ulp, relative
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# absolute rounding floor near zero (subnormal spacing)
TINY = {torch.float64: 1e-300, torch.float32: 1e-38, torch.float16: 2.0**-24, torch.bfloat16: 1e-38}
# relative error of a blocked/tree sum, against sigma * sum |g z|: a few hundred roundings deep
SUM_REL = {torch.float64: 1e-12, torch.float32: 3e-5}
SIGMA_REL = {torch.float64: 1e-12, torch.float32: 1e-5}  # a device std against the float64 std
# loose absolute output tolerance per dtype name, for values of order 1 (end-to-end API tests)
TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes in for values of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_index(numel: int, n_alpha: int, inner: int) -> torch.Tensor:
    """The contract's broadcast rule: element i uses ``alpha_flat[(i // inner) % n_alpha]``."""
    return (torch.arange(numel) // max(inner, 1)) % n_alpha


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
    sums = [
        torch.zeros(k, dtype=torch.float64).index_add_(0, idx, t) * float(sigma)
        for t in (g64 * z, (g64 * z).abs(), g64.abs())
    ]
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
        return (
            scale * z_tol
            + noise * sigma_rel
            + 4 * UNIT[math_dtype(dtype)] * (v.abs() + noise)
            + 1.01 * u_out * expected.abs()
            + TINY[dtype]
        )

    def grad_bound(self, expected, abs_gz, abs_g, acc_dtype, out_dtype, z_tol, sigma_rel=0.0):
        """Largest ``|grad - expected|`` of a correct alpha-gradient kernel (see grad_terms)."""
        return (
            z_tol * abs_g
            + SUM_REL[math_dtype(acc_dtype)] * abs_gz
            + (sigma_rel + 1.01 * self.unit_out(out_dtype)) * expected.abs()
            + TINY[out_dtype]
        )

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


# ---------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------

# name -> (v shape, alpha shape, inner): every alpha mode of the contract and every path of the
# kernels (tails, several blocks, inner below / above / equal to a block, runs straddling a block
# boundary, the CUDA thread / warp / elementwise stage-1 modes, the CPU row and column tilings).
CASES = {
    "layerwise-tail": ((7,), (1,), 1),
    "layerwise": ((64, 3, 3, 3), (), 1),
    "layerwise-multi-block": ((3, 1001), (1,), 1),
    "layerwise-large": ((100_003,), (1,), 1),
    "layerwise-huge": ((300_001,), (), 1),
    "conv-channelwise": ((16, 8, 3, 3), (16, 1, 1, 1), 72),
    "conv-channelwise-27": ((8, 3, 3, 3), (8,), 27),
    "linear-channelwise": ((10, 7), (10, 1), 7),
    "linear-channelwise-long": ((3, 5000), (3, 1), 5000),
    "long-rows": ((3, 2500), (3,), 2500),  # inner > BLOCK, not a multiple
    "aligned-rows": ((2, 2048), (2,), 2048),  # inner % BLOCK == 0
    "elementwise": ((12, 5, 3, 3), (12, 5, 3, 3), 1),
    "elementwise-small": ((6, 5), (30,), 1),
    "elementwise-odd": ((33, 7), (231,), 1),
    "act-channelwise-5x5": ((4, 6, 5, 5), (6,), 25),
    "act-channelwise-2x3": ((3, 5, 2, 3), (5,), 6),
    "act-channelwise-7x7": ((4, 6, 7, 7), (6,), 49),  # a run straddles the block boundary
    "act-channelwise-4x4": ((3, 4, 4, 4), (4,), 16),
    "act-channelwise-32x32": ((2, 3, 32, 32), (3,), 1024),
    "act-per-feature": ((9, 33), (33,), 1),
    "act-per-feature-13": ((80, 13), (13,), 1),
    "rows-multi-item": ((5, 40, 1000), (40,), 1000),
    "columns-tiles": ((3, 10_000), (10_000,), 1),
    "columns-tiles-inner2": ((3, 3000, 2), (3000,), 2),
}
# name -> (value dtype, alpha dtype); docs/ops.md: alpha has v's dtype, or float32 with half tensors
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16-alpha32": (torch.float16, torch.float32),
    "bfloat16-alpha32": (torch.bfloat16, torch.float32),
}


def case_numel(case: str) -> int:
    return math.prod(CASES[case][0])


def inputs(shape, alpha_shape, dtype=torch.float32, alpha_dtype=None, seed=0, device="cpu"):
    """(v, g, alpha, sigma): normal v and g, alpha in [0.1, 1.1), sigma 0.75 (float32)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen).to(dtype).to(device)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    alpha = (torch.rand(alpha_shape, generator=gen) + 0.1).to(alpha_dtype or dtype).to(device)
    return v, g, alpha, torch.tensor(0.75, device=device)
