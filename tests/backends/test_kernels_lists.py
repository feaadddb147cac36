"""The list ops, rng_state, float32 alpha with half tensors (AMP) and zero-size tensors on every
backend's kernels (docs/ops.md), against the single ops and the oracle's bounds. One body per
check, parametrized by backend (tests/support/kernels.py); backends without list ops skip those parts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kernels
import oracle
from kernels import OFFSET, SEED, check, model_like_lists, own_and_oracle_z
from oracle import CASES, flat64, grad_terms, inputs


# 45 > 31 tensors: the CUDA op splits the launch; base 2^40: counters far from zero
@pytest.mark.parametrize("count,base", [(5, 0), (45, 0), (4, 2**40)])
def test_multi_equals_single(kernel, count, base):
    kernel.need_multi()
    if kernel.interpreted and count > 32:
        pytest.skip("45 tensors test the CUDA op's 31-tensor launch split; the Triton interpreter needs minutes")
    vs, gs, alphas, sigmas, offsets, inners = model_like_lists(count, kernel.device, base, small=kernel.interpreted)
    outs = kernel.perturb_multi(vs, alphas, sigmas, [SEED], offsets, inners)
    grads = kernel.alpha_grad_multi(gs, alphas, sigmas, [SEED], offsets, inners)
    assert len(outs) == len(grads) == len(vs)
    for i, (v, g, a, s, o, n) in enumerate(zip(vs, gs, alphas, sigmas, offsets, inners)):
        assert torch.equal(outs[i], kernel.perturb(v, a, s, SEED, o, n)), i  # the same element-wise math
        single = kernel.alpha_grad(g, a, s, SEED, o, n)
        assert grads[i].shape == a.shape and grads[i].dtype == a.dtype, i
        if kernel.multi_grad_bitwise:
            assert torch.equal(grads[i], single), i  # same kernels, same partial order
        elif v.numel():  # one scan-based reduction for every tensor: each within the bound, not bitwise
            z_oracle, z_own = own_and_oracle_z(kernel, v, SEED, o)
            for got, what in ((grads[i], "multi"), (single, "single")):
                kernel.bounds.check_grad(got, g, a, s, n, z_oracle, z_own, what=f"tensor {i}, {what}")
        else:
            assert torch.equal(grads[i], torch.zeros_like(a)) and torch.equal(single, grads[i]), i


def test_multi_empty_list(kernel):
    kernel.need_multi()
    if kernel.name in kernels.CPP:
        pytest.skip(
            "the compiled list ops dispatch on their tensors' device, which an empty list lacks "
            "(the functional layer returns [] without calling them)"
        )
    assert kernel.perturb_multi([], [], [], [1], [], []) == []
    assert kernel.alpha_grad_multi([], [], [], [1], [], []) == []


def test_empty_tensors(kernel):
    dev = kernel.device
    v, alpha, s = torch.empty(0, 3, device=dev), torch.tensor(0.25, device=dev), torch.tensor(1.0, device=dev)
    assert kernel.perturb(v, alpha, s, 1, 0, 1).shape == (0, 3)
    g = kernel.alpha_grad(v, alpha, s, 1, 0, 1)
    assert g.shape == () and g.item() == 0.0
    assert kernel.noise(v, 1, 0).shape == (0, 3)
    if kernel.name in kernels.CPP:
        assert torch.ops.pni_fast.rng_words(v, 1, 0).shape == (0,)
        assert torch.ops.pni_fast.rng_uniform(v, 1, 0).shape == (0,)
    if kernel.has_multi:
        assert kernel.perturb_multi([v], [alpha], [s], [1], [0], [1])[0].shape == (0, 3)


def _state(seed: int, base: int, device) -> torch.Tensor:
    return torch.tensor([seed, base], dtype=torch.int64, device=device)


@pytest.mark.parametrize(
    "case", ["layerwise-multi-block", "long-rows", "act-channelwise-7x7", "elementwise-small", "conv-channelwise"]
)
def test_rng_state_equals_seed_and_offset(kernel, case):
    """rng_state (seed, base) draws exactly the noise of seed=seed, offset=base+offset; the seed
    argument is ignored and the state is not modified."""
    shape, alpha_shape, inner = CASES[case]
    v, g, alpha, sigma = inputs(shape, alpha_shape, device=kernel.device)
    seed, base, offset = 2**62 + 12345, 2**33 + 7, 11
    state = _state(seed, base, kernel.device)
    z = kernel.noise(v, 0, offset, state)
    assert torch.equal(z, kernel.noise(v, seed, base + offset))
    z_oracle, z_own = own_and_oracle_z(kernel, v, seed, base + offset, z=z)
    out = kernel.perturb(v, alpha, sigma, 0, offset, inner, state)
    kernel.bounds.check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own)
    assert torch.equal(out, kernel.perturb(v, alpha, sigma, seed, base + offset, inner))
    assert torch.equal(out, kernel.perturb(v, alpha, sigma, 999, offset, inner, state))  # seed ignored
    grad = kernel.alpha_grad(g, alpha, sigma, 0, offset, inner, rng_state=state)
    kernel.bounds.check_grad(grad, g, alpha, sigma, inner, z_oracle, z_own)
    assert torch.equal(grad, kernel.alpha_grad(g, alpha, sigma, seed, base + offset, inner))
    assert state.tolist() == [seed, base]


def test_rng_state_list_ops(kernel):
    """The list ops honour rng_state (every tensor's counters start at base + its offset)."""
    kernel.need_multi()
    base = 2**32 - 3
    state = _state(SEED, base, kernel.device)
    v, g, alpha, sigma = inputs((16, 8, 3, 3), (16,), device=kernel.device)
    w, gw, aw, sw = inputs((80, 13), (13,), seed=1, device=kernel.device)
    vs, gs, alphas, sigmas, inners = (
        [v, v[:3], w],
        [g, g[:3], gw],
        [alpha, alpha[:1], aw],
        [sigma, sigma, sw],
        [72, 1, 1],
    )
    offsets = [0, 300, 2000]
    shifted = [base + o for o in offsets]
    outs = kernel.perturb_multi(vs, alphas, sigmas, [0], offsets, inners, state)
    grads = kernel.alpha_grad_multi(gs, alphas, sigmas, [0], offsets, inners, state)
    for out, ref in zip(outs, kernel.perturb_multi(vs, alphas, sigmas, [SEED], shifted, inners)):
        assert torch.equal(out, ref)
    for grad, ref in zip(grads, kernel.alpha_grad_multi(gs, alphas, sigmas, [SEED], shifted, inners)):
        assert torch.equal(grad, ref)
    for v_, g_, a, s, off, inner, out, grad in zip(vs, gs, alphas, sigmas, shifted, inners, outs, grads):
        check(kernel, out, grad, v_, g_, a, s, inner, SEED, off)
    assert state.tolist() == [SEED, base]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    "case",
    [
        "layerwise",
        "layerwise-multi-block",
        "conv-channelwise",
        "act-channelwise-7x7",
        "elementwise",
        "elementwise-small",
        "act-per-feature",
    ],
)
def test_float32_alpha_with_half_tensors(kernel, dtype, case):
    """AMP: float32 alpha with float16/bfloat16 v; the alpha gradient comes back in float32, and a
    16-bit alpha (list ops) gets it in 16 bits."""
    shape, alpha_shape, inner = CASES[case]
    v, g, _, _ = inputs(shape, alpha_shape, dtype, device=kernel.device)
    alpha = (torch.rand(alpha_shape, generator=torch.Generator().manual_seed(5)) + 0.1).to(kernel.device)
    sigma = torch.tensor(0.75, device=kernel.device)
    out = kernel.perturb(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.dtype == dtype
    grad = kernel.alpha_grad(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.dtype == torch.float32 and grad.shape == alpha.shape
    # g is exact in float32; only the fp32 accumulation rounds (no rounding to the half dtype)
    z_oracle, z_own = own_and_oracle_z(kernel, v)
    kernel.bounds.check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own)
    kernel.bounds.check_grad(grad, g, alpha, sigma, inner, z_oracle, z_own)
    if not kernel.has_multi:
        return
    outs = kernel.perturb_multi(
        [v, v], [alpha, alpha.to(dtype)], [sigma, sigma], [SEED], [OFFSET, OFFSET], [inner, inner]
    )
    assert torch.equal(outs[0], out) and outs[1].dtype == dtype
    grads = kernel.alpha_grad_multi(
        [g, g], [alpha, alpha.to(dtype)], [sigma, sigma], [SEED], [OFFSET, OFFSET], [inner, inner]
    )
    assert grads[0].dtype == torch.float32 and grads[1].dtype == dtype
    kernel.bounds.check_grad(grads[0], g, alpha, sigma, inner, z_oracle, z_own, what="multi alpha grad")
    kernel.bounds.check_grad(
        grads[1], g, alpha.to(dtype), sigma, inner, z_oracle, z_own, what="multi alpha grad, half alpha"
    )


def test_float32_alpha_grad_does_not_overflow_with_float16(kernel):
    """An fp16 tensor whose exact alpha gradient (per channel) is far above float16's 65504: with float32
    alpha it is finite and matches float64 math. Large values, not many elements, make the overflow: g = 256 z
    gives terms 192 z^2 >= 0, ~196K per channel of 1024 elements."""
    rows, cols = 4, 1024
    n = rows * cols
    z = oracle.normal(SEED, OFFSET, n).astype(np.float64)
    g = (torch.from_numpy(z) * 256).to(torch.float16).reshape(rows, cols)  # g ~ z: every term g * z is >= 0
    sigma = torch.tensor(0.75)
    for alpha in (torch.ones(1), torch.ones(rows, 1)):  # layerwise, channelwise
        inner = 1 if alpha.numel() == 1 else cols
        dev_args = (g.to(kernel.device), alpha.to(kernel.device), sigma.to(kernel.device))
        grad = kernel.alpha_grad(*dev_args, SEED, OFFSET, inner)
        assert grad.dtype == torch.float32 and grad.shape == alpha.shape
        expected, _, _ = grad_terms(g, alpha, sigma, inner, torch.from_numpy(z))
        assert torch.all(expected.abs() > 65504)
        assert torch.isfinite(grad).all()
        kernel.bounds.check_grad(grad, g, alpha, sigma, inner, torch.from_numpy(z))  # the oracle's z
        if kernel.has_multi:
            (multi,) = kernel.alpha_grad_multi([dev_args[0]], [dev_args[1]], [dev_args[2]], [SEED], [OFFSET], [inner])
            if kernel.multi_grad_bitwise:
                assert torch.equal(multi, grad)
            kernel.bounds.check_grad(multi, g, alpha, sigma, inner, torch.from_numpy(z), what="multi alpha grad")


@pytest.mark.parametrize("inner", [0, 1])
@pytest.mark.parametrize(
    "shape,alpha_shape", [((4, 0), (4, 1)), ((4, 0), ()), ((4, 0), (4, 0)), ((0, 3, 3, 3), (0, 1, 1, 1))]
)
def test_zero_size_tensors_with_layer_alphas(kernel, shape, alpha_shape, inner):
    """A zero-size tensor with its layer's alpha (the layer passes inner = 0): empty output, zero
    alpha gradient in alpha's dtype, also with rng_state and through the list ops."""
    dev = kernel.device
    v = torch.empty(shape, dtype=torch.float16, device=dev)
    s = torch.tensor(1.0, device=dev)
    for alpha in (
        torch.full(alpha_shape, 0.25, device=dev),
        torch.full(alpha_shape, 0.25, dtype=torch.float16, device=dev),
    ):
        out = kernel.perturb(v, alpha, s, 1, 0, inner)
        assert out.shape == v.shape and out.dtype == v.dtype
        g = kernel.alpha_grad(v, alpha, s, 1, 0, inner, _state(3, 4, dev))
        assert g.shape == alpha.shape and g.dtype == alpha.dtype and not g.any()
        if kernel.has_multi:
            (g2,) = kernel.alpha_grad_multi([v], [alpha], [s], [1], [0], [inner])
            assert torch.equal(g2, g)
            (o2,) = kernel.perturb_multi([v], [alpha], [s], [1], [0], [inner])
            assert o2.shape == v.shape


def test_grad_terms_match_direct_float64_sums():
    """The oracle's gradient helper against sums written out for one small case (no backend)."""
    g = torch.arange(12, dtype=torch.float64).reshape(3, 4) - 5
    z = torch.linspace(-1, 1, 12, dtype=torch.float64)
    alpha = torch.ones(2)
    exp, abs_gz, abs_g = grad_terms(g, alpha, 0.5, 2, z)
    gz = (g.reshape(-1) * z).tolist()
    direct = [0.5 * sum(gz[i] for i in range(12) if (i // 2) % 2 == k) for k in (0, 1)]
    assert torch.allclose(exp, torch.tensor(direct, dtype=torch.float64), rtol=1e-15, atol=0)
    assert math.isclose(float(abs_g.sum()), 0.5 * float(g.abs().sum()))
    assert torch.all(abs_gz >= exp.abs()) and flat64(abs_gz).shape == (2,)
