"""perturb and its alpha gradient (docs/ops.md) on every backend's kernels against float64 math.

Each output is checked twice with the oracle's bounds (tests/support/oracle.py): against float64 math on
the oracle's z (allowing ``|alpha sigma| * Z_TOL`` for the noise plus rounding) and against float64
math on the backend's own z (its noise op, same seed and offset), where only rounding remains.
Bitwise equality is asserted only where the same kernel sees the same values (reruns, views copied
to contiguous). One body per check, parametrized by backend (tests/support/kernels.py).

test_perturb_and_alpha_grad runs chosen (shape, dtype, counter) cases, not every dtype x shape:

==========================================  ==================================================
behaviour                                   case(s)
==========================================  ==================================================
every alpha mode and kernel path (tails,    every shape of oracle.CASES, in float32
blocks, inner below / equal to / above a
block, CPU row and column tilings, CUDA
thread / warp / direct stage 1)
each dtype, general case (channelwise,      act-channelwise-7x7 in float64, float16, bfloat16,
runs straddling blocks)                     bfloat16-alpha32; conv-channelwise-float16-alpha32
alpha numel 1 (layerwise; 0-d alpha)        layerwise-multi-block (float64, bfloat16),
                                            layerwise-1025-float16; layerwise (float32,
                                            float16-alpha32: 0-d)
per-channel, inner >= 64 / < 64             conv-channelwise / act-channelwise-7x7 (float16)
elementwise (inner 1, CUDA direct mode)     elementwise-odd in float64, float16, bfloat16,
                                            bfloat16-alpha32
float32 alpha of half tensors               *-alpha32
numel % 4 != 0, block edges                 layerwise-tail, layerwise-multi-block,
                                            elementwise-odd, layerwise-1025 (1024 + 1),
                                            aligned-rows / act-channelwise-32x32 (inner a
                                            multiple of the block)
counters crossing 2^32 (c0 -> c1)           OFFSET = 2^32 - 100, every case over 400 elements
odd first counter                           elementwise-odd-float64-odd-counter
up to the last counter, 2^63 - 2            layerwise-multi-block-bfloat16-last-counters
odd storage offsets (no vector loads)       test_unaligned_views
zero-size tensors, sigma in v's dtype       test_sigma_in_value_dtype_and_empty
==========================================  ==================================================
"""

from __future__ import annotations

import math

import pytest
import torch

from pni_fast.reference import reference_noisy_weight

import oracle
from kernels import OFFSET, SEED, check, own_and_oracle_z
from oracle import CASES, DTYPES, Z_TOL, flat64, inputs

INTERPRETER_MAX = 16_000  # elements: Triton's interpreter runs every block op in numpy
# the pure-PyTorch backend has one code path for every size (no blocks or tiles to cross) and its
# integer-op Philox is slow: the large cases exercise the fused kernels' tilings
TORCH_MAX = 16_000


# test_perturb_and_alpha_grad's cases: (shape case, dtype name, first counter). Every shape of
# oracle.CASES in float32; each other dtype on the paths where the dtype changes the code (CPU: the
# float16 block conversion of the forward and of the row-strategy gradient, the float32 alpha gradient
# written without a conversion; CUDA: vector widths and tails; Triton: the float64 kernels).
EXTRA_CASES = {"layerwise-1025": ((1025,), (1,), 1)}  # one past a Triton / CUDA block of 1024 elements
ODD_COUNTER = OFFSET + 1
LAST_COUNTERS = 2**63 - 2 - (3003 + 3) // 4 + 1  # layerwise-multi-block's last counter is 2^63 - 2
_COUNTER_IDS = {OFFSET: "", ODD_COUNTER: "-odd-counter", LAST_COUNTERS: "-last-counters"}
_CHOSEN = [(case, "float32", OFFSET) for case in CASES] + [
    ("act-channelwise-7x7", "float64", OFFSET),  # channelwise, runs straddling blocks (CPU columns)
    ("layerwise-multi-block", "float64", OFFSET),  # layerwise alpha over several blocks, numel % 4 == 3
    ("elementwise-odd", "float64", ODD_COUNTER),  # elementwise (CUDA direct mode), odd numel
    ("conv-channelwise", "float16", OFFSET),  # inner 72: CPU row strategy (float16 conversion)
    ("act-channelwise-7x7", "float16", OFFSET),  # inner 49: CPU column strategy, CUDA thread mode
    ("layerwise-1025", "float16", OFFSET),  # block + 1, a lone element in the last vector
    ("elementwise-odd", "float16", OFFSET),
    ("act-channelwise-7x7", "bfloat16", OFFSET),
    ("layerwise-multi-block", "bfloat16", LAST_COUNTERS),  # up to the last Philox counter, 2^63 - 2
    ("elementwise-odd", "bfloat16", OFFSET),
    ("conv-channelwise", "float16-alpha32", OFFSET),  # float32 gradient of half tensors: no conversion
    ("layerwise", "float16-alpha32", OFFSET),  # a 0-d alpha
    ("act-channelwise-7x7", "bfloat16-alpha32", OFFSET),
    ("elementwise-odd", "bfloat16-alpha32", OFFSET),
]
PERTURB_CASES = [pytest.param(c, d, o, id=f"{c}-{d}{_COUNTER_IDS[o]}") for c, d, o in _CHOSEN]


@pytest.mark.parametrize("case,dtype,offset", PERTURB_CASES)
def test_perturb_and_alpha_grad(kernel, case, dtype, offset):
    shape, alpha_shape, inner = {**CASES, **EXTRA_CASES}[case]
    numel = math.prod(shape)
    if kernel.interpreted and numel > INTERPRETER_MAX:
        pytest.skip(f"{numel} elements are too many for the Triton interpreter (compiled: GPU run)")
    if kernel.name == "torch" and numel > TORCH_MAX:
        pytest.skip(f"{numel} elements: the pure-PyTorch backend has no tiling to test and is slow")
    v, g, alpha, sigma = inputs(shape, alpha_shape, *DTYPES[dtype], device=kernel.device)
    out = kernel.perturb(v, alpha, sigma, SEED, offset, inner)
    assert out.shape == v.shape and out.dtype == v.dtype and out.device == v.device and out.is_contiguous()
    grad = kernel.alpha_grad(g, alpha, sigma, SEED, offset, inner)
    assert grad.shape == alpha.shape and grad.dtype == alpha.dtype  # accumulated in fp32/fp64 inside
    check(kernel, out, grad, v, g, alpha, sigma, inner, offset=offset)


def test_sigma_in_value_dtype_and_empty(kernel, float_dtype):
    """sigma may have v's dtype (or float32); empty tensors give empty outputs and a zero gradient."""
    v, g, alpha, _ = inputs((5, 40), (5, 1), float_dtype, device=kernel.device)
    sigma = torch.tensor(0.5, dtype=float_dtype, device=kernel.device)
    out = kernel.perturb(v, alpha, sigma, 1, 2, 40)
    assert out.dtype == float_dtype
    grad = kernel.alpha_grad(g, alpha, sigma, 1, 2, 40)
    check(kernel, out, grad, v, g, alpha, sigma, 40, seed=1, offset=2)
    empty = torch.empty(0, 3, device=kernel.device)
    one, s = torch.ones(1, device=kernel.device), torch.tensor(1.0, device=kernel.device)
    assert kernel.perturb(empty, one, s, 1, 0, 1).shape == (0, 3)
    zero = kernel.alpha_grad(empty, one, s, 1, 0, 1)
    assert zero.shape == (1,) and zero.item() == 0.0
    scalar = kernel.alpha_grad(empty, torch.tensor(0.25, device=kernel.device), s, 1, 0, 1)
    assert scalar.shape == () and scalar.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_checks_reject_defects(kernel, dtype):
    """The contract bounds can fail: noise of a neighbouring offset or seed, one perturbed output
    element or one alpha gradient missing a single term are out of bounds."""
    shape, alpha_shape, inner = CASES["act-channelwise-7x7"]
    n_alpha = math.prod(alpha_shape)
    v, g, alpha, sigma = inputs(shape, alpha_shape, dtype, device=kernel.device)
    out = kernel.perturb(v, alpha, sigma, SEED, OFFSET, inner)
    grad = kernel.alpha_grad(g, alpha, sigma, SEED, OFFSET, inner)
    check(kernel, out, grad, v, g, alpha, sigma, inner)
    for seed, offset in ((SEED, OFFSET + 1), (SEED + 1, OFFSET)):
        with pytest.raises(AssertionError, match="out of bounds"):
            check(kernel, out, None, v, g, alpha, sigma, inner, seed, offset)
        with pytest.raises(AssertionError, match="out of bounds"):
            check(kernel, None, grad, v, g, alpha, sigma, inner, seed, offset)
    z = oracle.z64(v.numel(), SEED, OFFSET)
    bumped = out.clone()  # ten times the rounding of the dtype and the noise allowance
    bumped.view(-1)[100] += 10 * max(Z_TOL, kernel.bounds.unit_out(dtype)) * (1 + abs(float(out.view(-1)[100])))
    with pytest.raises(AssertionError, match=f"1 of {v.numel()} elements"):
        kernel.bounds.check_perturb(bumped, v, alpha, sigma, inner, z)
    gz = flat64(g) * z
    i = int(gz.abs().argmax())  # drop the largest term of one alpha gradient
    lost = grad.clone()
    lost[(i // inner) % n_alpha] -= float(sigma) * float(gz[i])
    with pytest.raises(AssertionError, match=f"1 of {n_alpha} elements"):
        kernel.bounds.check_grad(lost, g, alpha, sigma, inner, z)


def test_perturb_does_not_modify_inputs(kernel, float_dtype):
    v, g, alpha, sigma = inputs((33, 17), (33, 1), float_dtype, device=kernel.device)
    before = [t.clone() for t in (v, g, alpha, sigma)]
    kernel.perturb(v, alpha, sigma, 1, 0, 17)
    kernel.alpha_grad(g, alpha, sigma, 1, 0, 17)
    assert all(torch.equal(a, b) for a, b in zip((v, g, alpha, sigma), before))


def test_perturb_float64_uses_double_math(kernel):
    dev = kernel.device
    v = torch.full((8,), 1.0, dtype=torch.float64, device=dev) + 1e-12
    alpha = torch.tensor(1e-9, dtype=torch.float64, device=dev)
    out = kernel.perturb(v, alpha, torch.tensor(1.0, dtype=torch.float64, device=dev), 3, 0, 1)
    z = kernel.noise(v, 3, 0).double()
    torch.testing.assert_close(out, v + 1e-9 * z, rtol=0, atol=1e-15)


def test_non_contiguous_inputs(kernel):
    """Elements are taken in logical (row-major) order whatever the memory layout."""
    dev = kernel.device
    v, g, alpha, sigma = inputs((40, 30), (40, 30), device=dev)
    vt, at_, gt = v.t(), alpha.t(), g.t()  # non-contiguous views, shape (30, 40)
    assert not vt.is_contiguous()
    out = kernel.perturb(vt, at_, sigma, 9, 0, 1)
    assert out.shape == (30, 40) and out.is_contiguous()
    assert torch.equal(out, kernel.perturb(vt.contiguous(), at_.contiguous(), sigma, 9, 0, 1))
    same_grad(
        kernel,
        kernel.alpha_grad(gt, at_, sigma, 9, 0, 1),
        kernel.alpha_grad(gt.contiguous(), at_.contiguous(), sigma, 9, 0, 1),
        gt,
        at_,
        sigma,
        1,
        9,
        0,
    )
    rows = torch.rand(30, device=dev)  # channelwise alpha on a transposed tensor
    assert torch.equal(
        kernel.perturb(vt, rows, sigma, 1, 2, 40), kernel.perturb(vt.contiguous(), rows, sigma, 1, 2, 40)
    )
    same_grad(
        kernel,
        kernel.alpha_grad(gt, rows, sigma, 1, 2, 40),
        kernel.alpha_grad(gt.contiguous(), rows, sigma, 1, 2, 40),
        gt,
        rows,
        sigma,
        40,
        1,
        2,
    )
    w, _, a, _ = inputs((8, 4, 3, 3), (8, 1, 1, 1), device=dev)  # channels_last conv weight
    wcl = w.to(memory_format=torch.channels_last)
    assert torch.equal(kernel.perturb(wcl, a, w.std(), 4, 2, 36), kernel.perturb(w, a, w.std(), 4, 2, 36))


def same_grad(kernel, got, contiguous, g, alpha, sigma, inner, seed, offset):
    """A fused kernel reads a view's values in logical order: the same bits as from a contiguous copy.
    The pure-PyTorch backend sums with torch.sum, whose order follows the strides: both within the bounds."""
    if kernel.name != "torch":
        assert torch.equal(got, contiguous)
        return
    z_oracle, z_own = own_and_oracle_z(kernel, g, seed, offset)
    for t in (got, contiguous):
        kernel.bounds.check_grad(t, g, alpha, sigma, inner, z_oracle, z_own)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_unaligned_views(kernel, dtype):
    """Views starting at storage_offset % 4 != 0 (no vector loads): same results as aligned copies."""
    vdtype = DTYPES[dtype][0]
    dev = kernel.device
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(4 * 4099 + 8, generator=gen).to(vdtype).to(dev)
    gbase = torch.randn(4 * 4099 + 8, generator=gen).to(vdtype).to(dev)
    abase = (torch.rand(64, generator=gen) + 0.1).to(vdtype).to(dev)
    sigma = torch.tensor(0.75, device=dev)
    for off in (1,) if kernel.interpreted else (1, 2, 3):  # the interpreter needs ~8 s per offset
        for shape, n_alpha, inner in [((4099,), 1, 1), ((17, 241), 17, 241), ((4, 1024), 4, 1024)]:
            n = math.prod(shape)
            v = base[off : off + n].view(shape)
            g = gbase[off + 4 : off + 4 + n].view(shape)
            alpha = abase[off : off + n_alpha]
            assert v.storage_offset() % 4 != 0 and v.is_contiguous()
            out = kernel.perturb(v, alpha, sigma, SEED, OFFSET, inner)
            assert torch.equal(out, kernel.perturb(v.clone(), alpha.clone(), sigma, SEED, OFFSET, inner)), (off, shape)
            z_oracle = oracle.z64(n, SEED, OFFSET)
            kernel.bounds.check_perturb(out, v, alpha, sigma, inner, z_oracle, what=f"out, offset {off}, {shape}")
            if kernel.has_multi:
                (out_multi,) = kernel.perturb_multi([v], [alpha], [sigma], [SEED], [OFFSET], [inner])
                assert torch.equal(out_multi, out), (off, shape)
            grad = kernel.alpha_grad(g, alpha, sigma, SEED, OFFSET, inner)
            aligned = kernel.alpha_grad(g.clone(), alpha.clone(), sigma, SEED, OFFSET, inner)
            if kernel.name == "cuda":  # loads change, the summation order does not
                assert torch.equal(grad, aligned), (off, shape)
            z_own = flat64(kernel.noise(v, SEED, OFFSET))
            kernel.bounds.check_grad(
                grad, g, alpha, sigma, inner, z_oracle, z_own, what=f"alpha grad, offset {off}, {shape}"
            )


def test_perturb_propagates_nan_and_inf(kernel):
    v = torch.zeros(300, device=kernel.device)
    v[5], v[260] = float("nan"), float("inf")
    out = kernel.perturb(v, torch.tensor(0.25, device=kernel.device), torch.tensor(1.0, device=kernel.device), 8, 0, 1)
    assert torch.isnan(out[5]) and torch.isinf(out[260])
    mask = torch.ones(300, dtype=torch.bool, device=kernel.device)
    mask[[5, 260]] = False
    assert torch.isfinite(out[mask]).all()


def test_alpha_grad_deterministic(kernel):
    cases = (
        [((4, 6, 7, 7), (6,), 49)]
        if kernel.interpreted
        else [((1 << 20,), (1,), 1), ((64, 32, 3, 3), (64,), 288), ((8, 16, 14, 14), (16,), 196)]
    )
    for shape, alpha_shape, inner in cases:
        _, g, alpha, sigma = inputs(shape, alpha_shape, device=kernel.device)
        first = kernel.alpha_grad(g, alpha, sigma, 3, 0, inner)
        for _ in range(3):
            assert torch.equal(kernel.alpha_grad(g, alpha, sigma, 3, 0, inner), first)


def test_alpha_grad_is_gradient_of_perturb(kernel):
    """d/dalpha sum(grad * perturb(v, alpha)), by autograd on the explicit formula with the backend's z."""
    v, grad, alpha, _ = inputs((6, 4, 3, 3), (6, 1, 1, 1), device=kernel.device)
    sigma = v.std()
    z = kernel.noise(v, 21, 3)
    a = alpha.clone().requires_grad_(True)
    (grad * (v + a * sigma * z)).sum().backward()
    got = kernel.alpha_grad(grad, alpha, sigma, 21, 3, 36)
    torch.testing.assert_close(got, a.grad, rtol=1e-5, atol=1e-5)


def test_matches_paper_reference_layer_math(kernel):
    """perturb with sigma = std(w) is reference_noisy_weight with the same z (the backend's own,
    float64 math: agreement to float64 rounding); its autograd gives alpha's grad. Against the
    oracle's z, the contract bounds."""
    dev = kernel.device
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64)
    alpha = torch.full((6, 1, 1, 1), 0.25, dtype=torch.float64, requires_grad=True)
    z_oracle, z_own = own_and_oracle_z(kernel, w.to(dev))
    expected = reference_noisy_weight(w, alpha, z_own.reshape(w.shape))
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    expected.backward(g)
    sigma = w.std().to(dev)
    out = kernel.perturb(w.to(dev), alpha.detach().to(dev), sigma, SEED, OFFSET, 27)
    torch.testing.assert_close(out.cpu(), expected.detach(), rtol=0, atol=1e-12)
    grad = kernel.alpha_grad(g.to(dev), alpha.detach().to(dev), sigma, SEED, OFFSET, 27)
    torch.testing.assert_close(grad.cpu(), alpha.grad, rtol=1e-12, atol=1e-12)
    kernel.bounds.check_perturb(out, w, alpha, sigma, 27, z_oracle)
    kernel.bounds.check_grad(grad, g, alpha, sigma, 27, z_oracle)


@pytest.mark.parametrize("with_state", [False, True], ids=["seed", "rng_state"])
def test_opcheck(kernel, with_state):
    """Schema, fake kernel, autograd registration and AOT dispatch of every op of the backend."""
    v, g, alpha, sigma = inputs((8, 3, 3, 3), (8,), device=kernel.device)
    state = (torch.tensor([SEED, 40], device=kernel.device),) if with_state else ()
    args = (1, 0, 27) + state
    torch.library.opcheck(kernel.perturb.default, (v, alpha, sigma) + args)
    torch.library.opcheck(kernel.perturb.default, (v, alpha.clone().requires_grad_(), sigma) + args)
    torch.library.opcheck(kernel.alpha_grad.default, (g, alpha, sigma) + args)
    torch.library.opcheck(kernel.alpha_grad.default, (g.clone().requires_grad_(), alpha, sigma) + args)
    torch.library.opcheck(kernel.noise.default, (v, 1, 0) + state)
    if kernel.has_multi:
        lists = ([v, v[:2]], [alpha, alpha[:1]], [sigma, sigma], [1], [0, 100], [27, 1]) + state
        torch.library.opcheck(kernel.perturb_multi.default, lists)
        torch.library.opcheck(kernel.alpha_grad_multi.default, lists)


def test_outputs_are_fresh_tensors(kernel):
    """No op returns (a view of) an input: autograd refuses in-place ops on such results."""
    v, g, alpha, sigma = inputs((4, 6), (4, 1), device=kernel.device)
    results = [
        kernel.perturb(v, alpha, sigma, 1, 0, 6),
        kernel.alpha_grad(g, alpha, sigma, 1, 0, 6),
        kernel.noise(v, 1, 0),
    ]
    if kernel.has_multi:
        results += kernel.perturb_multi([v], [alpha], [sigma], [1], [0], [6])
        results += kernel.alpha_grad_multi([g], [alpha], [sigma], [1], [0], [6])
    inputs_ = {t.untyped_storage().data_ptr() for t in (v, g, alpha, sigma)}
    for r in results:
        assert r.untyped_storage().data_ptr() not in inputs_
