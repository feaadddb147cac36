"""The CUDA kernels' per-thread bodies (csrc/cuda/perturb_impl.cuh) run on the CPU by
tests/support/cuda_host_emulation.cpp, with the kernels' work mapping, checked against the numpy oracle:
every stage-1 mode, unaligned pointers, lists equal to single tensors bit for bit, 16-bit dtypes,
rng_state and a float32 alpha with a float16 gradient. Index types, magic-number division and the
stage-2 block reduction: tests/backends/test_cuda_emulation_index.py. No GPU needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from cuda_emulation_support import (
    EMU_CASES,
    OFFSET,
    SEED,
    emulation_library,
    oracle_expected,
    run_emulation,
    run_emulation_torch,
)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The host emulation of the CUDA kernels (tests/support/cuda_host_emulation.cpp), built once per session."""
    return emulation_library(tmp_path_factory)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(EMU_CASES))
def test_emulated_kernels_match_oracle(emu, case, dtype):
    n, n_alpha, inner = EMU_CASES[case]
    rng = np.random.default_rng(0)
    v = rng.standard_normal(n).astype(dtype)
    alpha = (rng.random(n_alpha) + 0.1).astype(dtype)
    sigma = np.array(0.75, dtype=np.float32)
    (out,) = run_emulation(emu, "emu_perturb", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [v])
    np.testing.assert_allclose(
        out, oracle_expected("out", v, alpha, sigma, inner), rtol=0, atol=2e-6 if dtype == np.float32 else 2e-6 * 0.9
    )
    (grad,) = run_emulation(emu, "emu_alpha_grad", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
    expected = oracle_expected("grad", v, alpha, sigma, inner)
    scale = 1.0 + np.abs(expected).max()
    np.testing.assert_allclose(grad / scale, expected / scale, rtol=0, atol=2e-5 if dtype == np.float32 else 2e-6)


def test_emulated_unaligned_pointers_and_sigma_dtype(emu):
    """Views starting one element in take the scalar (non-vector) path; sigma in v's dtype."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal(1 + 4 * 300).astype(np.float32)
    v = base[1:]  # 4-byte aligned only: no float4 access
    alpha = (rng.random(1 + 4) + 0.1).astype(np.float32)[1:]
    sigma = np.array(0.5, dtype=np.float32)
    (out,) = run_emulation(emu, "emu_perturb", [v], [alpha], [sigma], [3], [300], 5, [v])
    np.testing.assert_allclose(out, oracle_expected("out", v, alpha, sigma, 300, 5, 3), rtol=0, atol=2e-6)
    v64 = v.astype(np.float64)
    a64 = alpha.astype(np.float64)
    s64 = np.array(0.5, dtype=np.float64)
    (grad,) = run_emulation(emu, "emu_alpha_grad", [v64], [a64], [s64], [3], [300], 5, [a64])
    np.testing.assert_allclose(grad, oracle_expected("grad", v64, a64, s64, 300, 5, 3), rtol=1e-6, atol=1e-6)


def test_emulated_multi_equals_single_bitwise(emu):
    """A list of 40 tensors (two packs of at most 31) gives the single-tensor bits for every tensor."""
    rng = np.random.default_rng(2)
    specs = [(16 * 27, 16, 27), (16 * 144, 1, 1), (32 * 144, 32 * 144, 1), (10 * 64, 10, 64), (0, 1, 1)]
    ins, alphas, sigmas, offsets, inners = [], [], [], [], []
    offset = 11
    for i in range(40):
        n, n_alpha, inner = specs[i % len(specs)]
        ins.append(rng.standard_normal(n).astype(np.float32))
        alphas.append((rng.random(n_alpha) + 0.1).astype(np.float32))
        sigmas.append(np.array(0.1 + i / 40, dtype=np.float32))
        offsets.append(offset)
        inners.append(inner)
        offset += (n + 3) // 4
    outs = run_emulation(emu, "emu_perturb", ins, alphas, sigmas, offsets, inners, SEED, ins)
    grads = run_emulation(emu, "emu_alpha_grad", ins, alphas, sigmas, offsets, inners, SEED, alphas)
    for i in range(40):
        if ins[i].size == 0:
            continue  # untouched by the kernels; the op layer returns empty / zeros
        (single,) = run_emulation(
            emu, "emu_perturb", [ins[i]], [alphas[i]], [sigmas[i]], [offsets[i]], [inners[i]], SEED, [ins[i]]
        )
        np.testing.assert_array_equal(outs[i], single)
        (single_g,) = run_emulation(
            emu, "emu_alpha_grad", [ins[i]], [alphas[i]], [sigmas[i]], [offsets[i]], [inners[i]], SEED, [alphas[i]]
        )
        np.testing.assert_array_equal(grads[i], single_g)
        np.testing.assert_allclose(
            outs[i],
            oracle_expected("out", ins[i], alphas[i], sigmas[i], inners[i], SEED, offsets[i]),
            rtol=0,
            atol=2e-6,
        )


def test_emulated_per_tensor_seeds_equal_single_bitwise(emu):
    """One seed per tensor (Desc::seed): 36 tensors (two packs) at offset 0 each give the single-tensor bits
    of their own seed; with an rng_state every tensor takes the state's seed instead."""
    rng = np.random.default_rng(5)
    specs = [(16 * 27, 16, 27), (601, 1, 1), (231, 231, 1), (3 * 5000, 3, 5000)]
    ins, alphas, sigmas, inners, seeds = [], [], [], [], []
    for i in range(36):
        n, n_alpha, inner = specs[i % len(specs)]
        ins.append(rng.standard_normal(n).astype(np.float32))
        alphas.append((rng.random(n_alpha) + 0.1).astype(np.float32))
        sigmas.append(np.array(0.5 + i / 36, dtype=np.float32))
        inners.append(inner)
        seeds.append(int(SEED) + 7919 * i if i % 3 else 2**63 - 1 - i)
    zeros = [0] * len(ins)
    outs = run_emulation(emu, "emu_perturb", ins, alphas, sigmas, zeros, inners, seeds, ins)
    grads = run_emulation(emu, "emu_alpha_grad", ins, alphas, sigmas, zeros, inners, seeds, alphas)
    for i in range(len(ins)):
        one = ([ins[i]], [alphas[i]], [sigmas[i]], [0], [inners[i]], seeds[i])
        (single,) = run_emulation(emu, "emu_perturb", *one, [ins[i]])
        np.testing.assert_array_equal(outs[i], single)
        (single_g,) = run_emulation(emu, "emu_alpha_grad", *one, [alphas[i]])
        np.testing.assert_array_equal(grads[i], single_g)
    np.testing.assert_allclose(
        outs[1], oracle_expected("out", ins[1], alphas[1], sigmas[1], inners[1], seeds[1], 0), rtol=0, atol=2e-6
    )
    state = (SEED, 40)
    with_state = run_emulation(
        emu, "emu_perturb", ins[:3], alphas[:3], sigmas[:3], zeros[:3], inners[:3], seeds[:3], ins[:3], state=state
    )
    shared = run_emulation(emu, "emu_perturb", ins[:3], alphas[:3], sigmas[:3], [40] * 3, inners[:3], SEED, ins[:3])
    for a, b in zip(with_state, shared):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", ["conv-channelwise-warp", "elementwise-direct", "act-7x7-thread-mode", "layerwise-warp-many-chunks"]
)
def test_emulated_kernels_16bit(emu, case, dtype):
    """c10::Half / c10::BFloat16 paths (math in float32, 64-bit vector accesses), sigma in v's dtype."""
    n, n_alpha, inner = EMU_CASES[case]
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(n, generator=gen).to(dtype)
    alpha = (torch.rand(n_alpha, generator=gen) + 0.1).to(dtype)
    sigma = torch.tensor(0.75, dtype=dtype)
    (out,) = run_emulation_torch(emu, "emu_perturb", [v], [alpha.float()], [sigma], [OFFSET], [inner], SEED, [v])
    expected = oracle_expected("out", v.double().numpy(), alpha.double().numpy(), 0.75, inner)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=tol, atol=tol)
    (grad,) = run_emulation_torch(
        emu, "emu_alpha_grad", [v], [alpha.float()], [sigma], [OFFSET], [inner], SEED, [alpha.float()]
    )
    expected = oracle_expected("grad", v.double().numpy(), alpha.double().numpy(), 0.75, inner)
    scale = 1.0 + np.abs(expected).max()
    np.testing.assert_allclose(
        grad.double().numpy() / scale, expected / scale, rtol=0, atol=1e-2 if dtype == torch.float16 else 5e-2
    )


@pytest.mark.parametrize("case", ["conv-channelwise-warp", "elementwise-direct", "per-feature-thread-mode"])
def test_emulated_rng_state(emu, case):
    """rng_state (seed, base): seed replaced, base added to every offset; the seed argument is ignored."""
    n, n_alpha, inner = EMU_CASES[case]
    rng = np.random.default_rng(4)
    v = rng.standard_normal(n).astype(np.float32)
    alpha = (rng.random(n_alpha) + 0.1).astype(np.float32)
    sigma = np.array(0.5, dtype=np.float32)
    seed2, base = 2**40 + 9, 2**33 + 5
    for fn, out_like in (("emu_perturb", v), ("emu_alpha_grad", alpha)):
        (with_state,) = run_emulation(
            emu, fn, [v], [alpha], [sigma], [OFFSET], [inner], 123, [out_like], state=(seed2, base)
        )
        (plain,) = run_emulation(emu, fn, [v], [alpha], [sigma], [OFFSET + base], [inner], seed2, [out_like])
        np.testing.assert_array_equal(with_state, plain)
    (out,) = run_emulation(emu, "emu_perturb", [v], [alpha], [sigma], [7], [inner], 0, [v], state=(seed2, base))
    np.testing.assert_allclose(out, oracle_expected("out", v, alpha, sigma, inner, seed2, base + 7), rtol=0, atol=2e-6)


def test_emulated_float32_alpha_half_grad_does_not_overflow(emu):
    """float16 grad, float32 alpha (AMP): the gradient stays float32, beyond float16's 65504."""
    n = 1 << 20
    z = torch.from_numpy(oracle.normal(SEED, OFFSET, n))
    g = z.half()  # sum(g * z) ~ n, far above 65504
    alpha = torch.tensor([0.3], dtype=torch.float32)
    sigma = torch.tensor(1.5)
    (grad,) = run_emulation_torch(emu, "emu_alpha_grad", [g], [alpha], [sigma], [OFFSET], [1], SEED, [alpha])
    expected = (g.double() * z.double()).sum().item() * 1.5
    assert expected > 1e5 and np.isfinite(grad.item())
    assert abs(grad.item() - expected) <= 1e-5 * expected
