"""Host emulation of the CUDA kernels (tests/support/cuda_host_emulation.cpp): the 32- and 64-bit index
kernels, the magic-number division of the channelwise forward and stage 2 of the alpha gradient by
a whole block, checked against integer division and the numpy oracle. No GPU needed.
"""

from __future__ import annotations

import numpy as np
import pytest

import oracle
from cuda_emulation_support import (
    OFFSET,
    SEED,
    emulation_library,
    kChunk,
    oracle_expected,
    run_emulation,
)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The host emulation of the CUDA kernels (tests/support/cuda_host_emulation.cpp), built once per session."""
    return emulation_library(tmp_path_factory)


@pytest.fixture
def emu_bits(emu):
    """The emulation with a forced index type; back to the launcher's choice afterwards."""
    yield emu
    emu.emu_set_index_bits(0)


@pytest.mark.parametrize("bits", [32, 64])
def test_emulated_fastdiv(emu, bits):
    """x / d by magic numbers equals integer division, at the edges of the index range."""
    top = 2**31 - 1 if bits == 32 else 2**63 - 1
    divisors = [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        25,
        49,
        72,
        641,
        1000,
        4097,
        65535,
        65537,
        2**20 + 1,
        2**30 - 1,
        2**30,
        2**30 + 1,
        2**31 - 1,
    ]
    if bits == 64:
        divisors += [2**31, 2**32 - 1, 2**32 + 1, 3**30, 2**62 - 1, 2**62 + 1, 2**63 - 25]
    rng = np.random.default_rng(7)
    for d in divisors:
        xs = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, top, top - 1, top - (top % d), top - (top % d) - 1]
        xs += [int(v) for v in rng.integers(0, top, size=200, dtype=np.int64)]
        xs += [int(v) * d + r for v in rng.integers(0, top // d + 1, size=50, dtype=np.int64) for r in (0, d - 1)]
        x = np.array([v for v in xs if 0 <= v <= top], dtype=np.int64)
        out = np.zeros_like(x)
        emu.emu_fastdiv(bits, d, x.size, x.ctypes.data, out.ctypes.data)
        np.testing.assert_array_equal(out, x // d, err_msg=f"divisor {d}, {bits}-bit")


# (numel, alpha numel, inner): channelwise with several inner values (forward: magic-number division).
CHANNEL_CASES = [
    (3 * 6 * 1, 6, 1),
    (2 * 6 * 3, 6, 3),
    (4 * 5 * 4, 5, 4),
    (3 * 7 * 5, 7, 5),
    (2 * 6 * 7, 6, 7),
    (2 * 3 * 64, 3, 64),
    (2 * 4 * 1000, 4, 1000),
    (3 * 2 * 4097, 2, 4097),
    (16 * 27, 16, 27),
]


@pytest.mark.parametrize("case", CHANNEL_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CHANNEL_CASES])
def test_emulated_index_types_channelwise(emu_bits, case):
    """32- and 64-bit index kernels give the same bits; both match the oracle (several inner values)."""
    n, n_alpha, inner = case
    rng = np.random.default_rng(n)
    v = rng.standard_normal(n).astype(np.float32)
    alpha = (rng.random(n_alpha) + 0.1).astype(np.float32)
    sigma = np.array(0.6, dtype=np.float32)
    results = {}
    for bits in (32, 64):
        emu_bits.emu_set_index_bits(bits)
        (out,) = run_emulation(emu_bits, "emu_perturb", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [v])
        (grad,) = run_emulation(emu_bits, "emu_alpha_grad", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
        results[bits] = (out, grad)
    np.testing.assert_array_equal(results[32][0], results[64][0])
    np.testing.assert_array_equal(results[32][1], results[64][1])
    out, grad = results[32]
    np.testing.assert_allclose(out, oracle_expected("out", v, alpha, sigma, inner), rtol=0, atol=2e-6)
    expected = oracle_expected("grad", v, alpha, sigma, inner)
    scale = 1.0 + np.abs(expected).max()
    np.testing.assert_allclose(grad / scale, expected / scale, rtol=0, atol=2e-5)


def test_emulated_index_types_list_and_unaligned(emu_bits):
    """The list kernel (mixed layerwise / channelwise / elementwise) and the unaligned tail, both index types."""
    rng = np.random.default_rng(8)
    specs = [(16 * 27, 16, 27), (1001, 1, 1), (6 * 49 * 2, 6, 49), (77, 77, 1), (5 * 70, 5, 70)]
    ins, alphas, sigmas, offsets, inners = [], [], [], [], []
    offset = 3
    for i, (n, n_alpha, inner) in enumerate(specs):
        base = rng.standard_normal(n + 1).astype(np.float32)
        ins.append(base[1:] if i % 2 else base[:n])  # odd tensors start one element in: scalar path
        alphas.append((rng.random(n_alpha) + 0.1).astype(np.float32))
        sigmas.append(np.array(0.3 + i / 10, dtype=np.float32))
        offsets.append(offset)
        inners.append(inner)
        offset += (n + 3) // 4
    results = {}
    for bits in (32, 64):
        emu_bits.emu_set_index_bits(bits)
        results[bits] = run_emulation(emu_bits, "emu_perturb", ins, alphas, sigmas, offsets, inners, SEED, ins)
    for i in range(len(specs)):
        np.testing.assert_array_equal(results[32][i], results[64][i])
        np.testing.assert_allclose(
            results[32][i],
            oracle_expected("out", ins[i], alphas[i], sigmas[i], inners[i], SEED, offsets[i]),
            rtol=0,
            atol=2e-6,
        )


# Stage 2 with a block per alpha index: a layerwise alpha of a tensor with >= 1024 * 2048 elements
# (warp mode, over 1024 partials), and short segments with many rows (thread mode) over 5 blocks.
STAGE2_CASES = {
    "layerwise-block": (1024 * 2048 + 4 * 999 + 3, 1, 1),
    "thread-mode-5-blocks": (1100 * 5 * 4, 5, 4),
}


@pytest.mark.parametrize("case", list(STAGE2_CASES))
def test_emulated_stage2_block_reduction(emu, case):
    """Stage 2 by a whole block: planned as such, deterministic, within the rounding bound of the exact sum."""
    n, n_alpha, inner = STAGE2_CASES[case]
    assert emu.emu_stage2_block(n, n_alpha, inner) == 1
    assert emu.emu_stage2_block(4096, 1, 1) == 0  # few partials: a warp per index
    rng = np.random.default_rng(9)
    g = rng.standard_normal(n).astype(np.float32)
    alpha = (rng.random(n_alpha) + 0.1).astype(np.float32)
    sigma = np.array(0.75, dtype=np.float32)
    (grad,) = run_emulation(emu, "emu_alpha_grad", [g], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
    (again,) = run_emulation(emu, "emu_alpha_grad", [g], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
    np.testing.assert_array_equal(grad, again)  # deterministic
    # the emulation's own z: perturb of zeros with alpha * sigma = 1 (exact in float32)
    zeros = np.zeros(n, dtype=np.float32)
    (z,) = run_emulation(
        emu, "emu_perturb", [zeros], [np.ones(1, np.float32)], [np.array(1.0, np.float32)], [OFFSET], [1], SEED, [zeros]
    )
    np.testing.assert_allclose(z, oracle.normal(SEED, OFFSET, n), rtol=0, atol=2e-6)
    k = (np.arange(n) // inner) % n_alpha
    gz = g.astype(np.float64) * z.astype(np.float64)
    exact = np.bincount(k, weights=gz, minlength=n_alpha) * 0.75
    cond = np.bincount(k, weights=np.abs(gz), minlength=n_alpha) * 0.75
    # rounding bound of the two-stage float32 sum: (longest chain of additions) * eps * sum |g z|
    chain = kChunk // 4 // 32 * 4 + 5 + -(-n // kChunk // 256) + 5 + 8 + 2
    np.testing.assert_array_less(np.abs(grad - exact), chain * np.finfo(np.float32).eps * cond + 1e-30)
    # float64: same z, same order; bound n * eps64 * sum |g z|
    g64 = g.astype(np.float64)
    (grad64,) = run_emulation(
        emu,
        "emu_alpha_grad",
        [g64],
        [alpha.astype(np.float64)],
        [np.array(0.75)],
        [OFFSET],
        [inner],
        SEED,
        [alpha.astype(np.float64)],
    )
    # the float64 kernels compute z in float32 too (design.md section 3): the same z
    np.testing.assert_array_less(np.abs(grad64 - exact), n * np.finfo(np.float64).eps * cond + 1e-300)
