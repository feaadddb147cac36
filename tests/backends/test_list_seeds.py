"""Per-tensor seeds of the list ops (docs/ops.md): ``seeds`` holds one seed shared by every tensor or
one per tensor; with one per tensor, tensor k of ``perturb_multi`` / ``perturb_alpha_grad_multi`` is
the single op with seed ``seeds[k]`` and offset ``offsets[k]``, on every backend (tests/support/kernels.py),
and the eager fast path ``noisy_multi`` is ``noisy`` per tensor, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from pni_fast import _ext
from pni_fast.contract import message

from kernels import own_and_oracle_z
from oracle import inputs

# (shape, alpha shape, inner): channelwise, layerwise, elementwise, a zero-size tensor; tiny for the
# Triton interpreter. Seeds: above 2^32, small, near 2^63, and 0.
SPECS = [((6, 2, 3), (6, 1, 1), 6), ((5, 7), (1,), 1), ((3, 4), (3, 4), 1), ((0, 3), (1,), 1)]
SEEDS = [0x0DDB_A11_5EED, 3, 2**63 - 1, 0]


def _lists(device, dtype=torch.float32):
    vs, gs, alphas, sigmas, inners = [], [], [], [], []
    for k, (shape, alpha_shape, inner) in enumerate(SPECS):
        v, g, a, s = inputs(shape, alpha_shape, dtype, seed=k, device=device)
        vs.append(v), gs.append(g), alphas.append(a), sigmas.append(s), inners.append(inner)
    return vs, gs, alphas, sigmas, inners


@pytest.mark.parametrize("offsets", [[0, 0, 0, 0], [7, 2**32 - 1, 0, 5]], ids=["offsets0", "offsets"])
def test_per_tensor_seeds_equal_single_ops(kernel, offsets):
    kernel.need_multi()
    vs, gs, alphas, sigmas, inners = _lists(kernel.device)
    outs = kernel.perturb_multi(vs, alphas, sigmas, SEEDS, offsets, inners)
    grads = kernel.alpha_grad_multi(gs, alphas, sigmas, SEEDS, offsets, inners)
    for k, (v, g, a, s, seed, o, n) in enumerate(zip(vs, gs, alphas, sigmas, SEEDS, offsets, inners)):
        assert torch.equal(outs[k], kernel.perturb(v, a, s, seed, o, n)), k
        single = kernel.alpha_grad(g, a, s, seed, o, n)
        assert grads[k].shape == a.shape and grads[k].dtype == a.dtype, k
        if kernel.multi_grad_bitwise or v.numel() == 0:
            assert torch.equal(grads[k], single), k
        else:  # the Triton list op reduces with its own scan: each within the contract's bound
            z_oracle, z_own = own_and_oracle_z(kernel, v, seed, o)
            for got, what in ((grads[k], "multi"), (single, "single")):
                kernel.bounds.check_grad(got, g, a, s, n, z_oracle, z_own, what=f"tensor {k}, {what}")


def test_one_seed_is_shared(kernel):
    """seeds=[s] and seeds=[s] * len(vs) are the same call; distinct seeds give other noise."""
    kernel.need_multi()
    vs, gs, alphas, sigmas, inners = _lists(kernel.device)
    offsets = [0, 100, 200, 300]
    shared = kernel.perturb_multi(vs, alphas, sigmas, [SEEDS[0]], offsets, inners)
    repeated = kernel.perturb_multi(vs, alphas, sigmas, [SEEDS[0]] * len(vs), offsets, inners)
    per_tensor = kernel.perturb_multi(vs, alphas, sigmas, SEEDS, offsets, inners)
    for k in range(len(vs)):
        assert torch.equal(shared[k], repeated[k]), k
    assert torch.equal(shared[0], per_tensor[0])  # tensor 0 has seed SEEDS[0] either way
    assert not torch.equal(shared[1], per_tensor[1])
    g_shared = kernel.alpha_grad_multi(gs, alphas, sigmas, [SEEDS[0]], offsets, inners)
    g_repeated = kernel.alpha_grad_multi(gs, alphas, sigmas, [SEEDS[0]] * len(vs), offsets, inners)
    for a, b in zip(g_shared, g_repeated):
        assert torch.equal(a, b)


def test_rng_state_keys_every_tensor(kernel):
    """With rng_state the state's seed is every tensor's key (seeds: one ignored value)."""
    kernel.need_multi()
    vs, gs, alphas, sigmas, inners = _lists(kernel.device)
    offsets = [0, 10, 20, 30]
    state = torch.tensor([SEEDS[2], 40], dtype=torch.int64, device=kernel.device)
    outs = kernel.perturb_multi(vs, alphas, sigmas, [5], offsets, inners, state)
    ref = kernel.perturb_multi(vs, alphas, sigmas, [SEEDS[2]], [40 + o for o in offsets], inners)
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_seeds", [0, 2, 5])
@pytest.mark.parametrize("which", ["perturb_multi", "alpha_grad_multi"])
def test_seeds_length_error(kernel, n_seeds, which):
    kernel.need_multi()
    vs, gs, alphas, sigmas, inners = _lists(kernel.device)
    op = getattr(kernel, which)
    expected = message("seeds_length", f"{op._qualified_op_name.split('::')[-1]}: ", n_v=len(vs), n_seeds=n_seeds)
    with pytest.raises(ValueError) as info:
        op(vs if which == "perturb_multi" else gs, alphas, sigmas, list(range(1, n_seeds + 1)), [0] * 4, inners)
    assert str(info.value) == expected


def test_per_tensor_seeds_with_rng_state_error(kernel):
    kernel.need_multi()
    vs, _, alphas, sigmas, inners = _lists(kernel.device)
    state = torch.tensor([1, 0], dtype=torch.int64, device=kernel.device)
    name = kernel.perturb_multi._qualified_op_name.split("::")[-1]
    with pytest.raises(ValueError) as info:
        kernel.perturb_multi(vs, alphas, sigmas, SEEDS, [0] * 4, inners, state)
    assert str(info.value) == message("seeds_rng_state", f"{name}: ", n_seeds=len(SEEDS))


# ---------------------------------------------------------------------------
# The eager fast path (C++ CPU op noisy_multi)
# ---------------------------------------------------------------------------

needs_fast_path = pytest.mark.skipif(
    not (_ext.load() and _ext.has_op("noisy_multi", "cpu")), reason="the compiled library is not loaded"
)


@needs_fast_path
@pytest.mark.parametrize("save_noise_max", [0, 1 << 20], ids=["regenerated", "stored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_noisy_multi_per_tensor_seeds_equal_noisy(save_noise_max, dtype):
    """noisy_multi(seeds=[s0, ...], offsets 0) == noisy(v_k, seed=s_k) per tensor: outputs, the
    alpha gradients (bits) and the v gradients; the seeds argument's length follows perturb_multi."""
    specs = [s for s in SPECS if 0 not in s[0]] + [((8, 3, 3, 3), (8, 1, 1, 1), 27)]
    seeds = [0x0DDB_A11_5EED, 3, 2**63 - 1, 12345]
    vs0, gs, as0, inners = [], [], [], []
    for k, (shape, alpha_shape, inner) in enumerate(specs):
        v, g, a, _ = inputs(shape, alpha_shape, dtype, alpha_dtype=torch.float32, seed=k)
        vs0.append(v), gs.append(g), as0.append(a), inners.append(inner)
    zeros = [0] * len(vs0)

    def run(multi: bool):
        vs = [v.clone().requires_grad_() for v in vs0]
        als = [a.clone().requires_grad_() for a in as0]
        if multi:
            outs = torch.ops.pni_fast.noisy_multi(vs, als, zeros, inners, seeds, None, "weights", save_noise_max)
        else:
            outs = [
                torch.ops.pni_fast.noisy(v, a, 0, n, s, None, "weight") for v, a, n, s in zip(vs, als, inners, seeds)
            ]
        torch.autograd.backward(outs, gs)
        return [o.detach() for o in outs], [a.grad for a in als], [v.grad for v in vs]

    multi, single = run(True), run(False)
    for part, m, s in zip(("out", "alpha grad", "v grad"), multi, single):
        for k, (x, y) in enumerate(zip(m, s)):
            assert torch.equal(x, y), (part, k)


@needs_fast_path
def test_noisy_multi_seeds_none_and_length():
    """seeds=None draws one seed shared by every tensor (== seeds=[drawn]); a bad length is perturb_multi's
    error."""
    vs = [torch.randn(4, 3), torch.randn(6)]
    als = [torch.rand(4, 1), torch.tensor([0.3])]
    gen = torch.Generator().manual_seed(9)
    drawn = torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(9)).item()
    a = torch.ops.pni_fast.noisy_multi(vs, als, [0, 3], [3, 1], None, gen, "weights", 0)
    b = torch.ops.pni_fast.noisy_multi(vs, als, [0, 3], [3, 1], [drawn], None, "weights", 0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError) as info:
        torch.ops.pni_fast.noisy_multi(vs, als, [0, 3], [3, 1], [1, 2, 3], None, "weights", 0)
    assert str(info.value) == message("seeds_length", "perturb_multi: ", n_v=2, n_seeds=3)
