"""Device RNG states (the graph-safe seed source) on CPU: same state -> same stream, successive calls ->
fresh, non-overlapping counters, and the backward regenerates the noise of the forward's snapshot."""

import numpy as np
import pytest
import torch

import pni_fast

import kernels
import oracle

BACKENDS = kernels.backend_params("cpu", exclude=kernels.TRITON_ELSEWHERE)


def test_make_rng_state_layout_and_errors():
    s = pni_fast.make_rng_state(123)
    assert s.dtype == torch.int64 and s.tolist() == [123, 0]
    torch.manual_seed(0)
    a = pni_fast.make_rng_state()
    torch.manual_seed(0)
    assert torch.equal(a, pni_fast.make_rng_state())
    with pytest.raises(ValueError, match="seed"):
        pni_fast.make_rng_state(-1)
    w, al = torch.randn(4, 4), torch.tensor([0.2])
    with pytest.raises(ValueError, match="int64 of shape \\[2\\]"):
        pni_fast.noisy_weight(w, al, seed=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="int64 of shape \\[2\\]"):
        pni_fast.noisy_weight(w, al, seed=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="rng_state\\[1\\]"):
        pni_fast.noisy_weight(w, al, seed=torch.tensor([1, 2**63 - 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_stream_equals_seed_offset_contract(backend):
    w = torch.randn(6, 5)
    a = torch.tensor([0.3])
    state = pni_fast.make_rng_state(777)
    start = state.clone()
    outs = [pni_fast.noisy_weight(w, a, seed=state, backend=backend) for _ in range(3)]
    quads = -(-w.numel() // 4)
    assert state.tolist() == [777, 3 * quads]  # advanced past the counters used
    for k, out in enumerate(outs):
        expect = pni_fast.noisy_weight(w, a, seed=777, offset=k * quads, backend=backend)
        assert torch.equal(out, expect)
    assert not torch.equal(outs[0], outs[1])
    # same starting state -> same stream
    again = start.clone()
    assert all(torch.equal(o, pni_fast.noisy_weight(w, a, seed=again, backend=backend)) for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_noise_matches_oracle_and_counters_do_not_overlap(backend):
    state = torch.tensor([2**40 + 5, 2**32 - 3], dtype=torch.int64)  # counters cross the c0/c1 boundary
    z1 = pni_fast.randn((10,), seed=state, backend=backend)
    z2 = pni_fast.randn((7,), seed=state, backend=backend)
    ref = oracle.normal(2**40 + 5, 2**32 - 3, 12 + 7)
    np.testing.assert_allclose(z1.numpy(), ref[:10], atol=2e-6, rtol=0)
    np.testing.assert_allclose(z2.numpy(), ref[12:19], atol=2e-6, rtol=0)  # 10 elements used 3 counters
    assert state.tolist() == [2**40 + 5, 2**32 - 3 + 3 + 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_uses_the_forward_snapshot(backend):
    w = torch.randn(8, 3)
    a = torch.tensor([0.4], requires_grad=True)
    state = pni_fast.make_rng_state(5)
    out = pni_fast.noisy_weight(w, a, seed=state, backend=backend)
    pni_fast.noisy_weight(w, a, seed=state, backend=backend)  # advances the state again before backward
    (ga,) = torch.autograd.grad(out.sum(), a)
    a2 = a.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(pni_fast.noisy_weight(w, a2, seed=5, backend=backend).sum(), a2)
    torch.testing.assert_close(ga, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_weights_with_state(backend):
    ws = [torch.randn(3, 4), torch.randn(5)]
    alphas = [torch.tensor([0.2]), torch.tensor([0.3])]
    state = pni_fast.make_rng_state(9)
    outs = pni_fast.noisy_weights(ws, alphas, seed=state, backend=backend)
    ref = pni_fast.noisy_weights(ws, alphas, seed=9, backend=backend)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))
    assert state.tolist() == [9, 3 + 2]


def test_default_state_is_created_per_device_and_reused():
    s1 = pni_fast.default_rng_state("cpu")
    s2 = pni_fast.default_rng_state(torch.device("cpu"))
    assert s1 is s2 and s1.dtype == torch.int64 and s1.shape == (2,)


def test_modules_draw_fresh_noise_with_seed_none_and_follow_manual_seed():
    layer = pni_fast.NoisyLinear(4, 3)
    x = torch.randn(2, 4)
    torch.manual_seed(1)
    o1, o2 = layer(x), layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), o1) and not torch.equal(o1, o2)


def test_pni_manual_seed_survives_torch_reseeding():
    """An attack that calls torch.manual_seed per batch must not freeze PNI's noise once PNI has its own generator."""
    layer = pni_fast.NoisyLinear(4, 3)
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(0)
    assert torch.equal(layer(x), a), "default: PNI follows torch's generator"
    try:
        pni_fast.manual_seed(7)
        torch.manual_seed(0)
        b = layer(x)
        torch.manual_seed(0)
        c = layer(x)
        assert not torch.equal(b, c), "own generator: torch.manual_seed does not replay PNI's noise"
        pni_fast.manual_seed(7)
        assert torch.equal(layer(x), b), "pni_fast.manual_seed makes PNI's stream reproducible"
    finally:
        pni_fast.manual_seed(None)
    with pni_fast.own_generator(3):
        torch.manual_seed(0)
        d = layer(x)
        torch.manual_seed(0)
        assert not torch.equal(layer(x), d)
    torch.manual_seed(0)
    assert torch.equal(layer(x), a), "the previous source is restored after the block"
    with pytest.raises(ValueError, match="seed"):
        pni_fast.manual_seed(-3)
