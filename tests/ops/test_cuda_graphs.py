"""GPU tests of what needs a real device's runtime: torch.compile (fullgraph, reduce-overhead),
no host synchronisation, RNG state tensors and CUDA graph capture / replay, for the CUDA and the
Triton backends. Skipped with "no CUDA device" elsewhere (set-up: tests/support/cuda_support.py; the
kernels themselves: tests/test_kernels_*.py and tests/backends/test_cuda.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pni_fast

from cuda_support import (  # noqa: F401  (needs_device: autouse fixture)
    DEV,
    GPU_BACKENDS,
    ON_GPU,
    SEED,
    gpu_ops,
    grad_bound,
    inputs,
    needs_cuda_ext,
    needs_device,
    needs_rng_state,
    needs_triton,
    real_gpu,
)
from oracle import SIGMA_REL, UNIT, alpha_index, assert_within, flat64, grad_terms

pytestmark = [pytest.mark.cuda]


# ---------------------------------------------------------------------------
# torch.compile, no host sync
# ---------------------------------------------------------------------------


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    w = torch.randn(64, 32, 3, 3, device=DEV)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)

    def step(w, alpha):
        return pni_fast.noisy_weight(w, alpha, seed=1234, offset=0, backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(w, alpha)
    (grad_c,) = torch.autograd.grad(loss_c, alpha)
    loss_e = step(w, alpha)
    (grad_e,) = torch.autograd.grad(loss_e, alpha)
    # the same noise; only the order of the fp32 sums of squares differs
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-5 * float(grad_e.abs().max()))


@real_gpu
@needs_triton
def test_torch_compile_triton_op_directly():
    _, perturb, _, _, _ = gpu_ops("triton")
    v, _, alpha, sigma = inputs((1000, 3), 1, torch.float32)
    f = torch.compile(lambda v, a, s: perturb(v, a, s, 7, 0, 1) * 2, fullgraph=True)
    assert torch.equal(f(v, alpha, sigma), perturb(v, alpha, sigma, 7, 0, 1) * 2)


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_drawn_seed_fullgraph(backend):
    """seed=None inside torch.compile(fullgraph=True): fresh noise per call, backward uses the forward's noise."""
    torch._dynamo.reset()
    w = torch.randn(64, 32, 3, 3, device=DEV)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)
    g = torch.randn(w.shape, device=DEV)

    def step(w, alpha, g):
        out = pni_fast.noisy_weight(w, alpha, backend=backend)
        return out, (out * g).sum()

    compiled = torch.compile(step, fullgraph=True)
    sigma = float(pni_fast.weight_sigma(w))
    outs = []
    for _ in range(3):
        out, loss = compiled(w, alpha, g)
        (grad,) = torch.autograd.grad(loss, alpha)
        out64, w64 = flat64(out), flat64(w)
        z = (out64 - w64) / (0.25 * sigma)  # the noise this forward drew, recovered
        assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.1  # 18432 samples: > 6 sigma
        # z recovered from fp32 values: error from the rounding of out and of the kernel's math
        z_err = (
            4 * UNIT[torch.float32] * (out64.abs() + w64.abs()) / (0.25 * sigma) + SIGMA_REL[torch.float32] * z.abs()
        )
        exp, abs_gz, abs_g = grad_terms(g, alpha, sigma, 288, z)
        g_err = torch.zeros(64, dtype=torch.float64).index_add_(
            0, alpha_index(z.numel(), 64, 288), flat64(g).abs() * z_err
        )
        bound = grad_bound(exp, abs_gz, abs_g, torch.float32, torch.float32, 0.0, SIGMA_REL[torch.float32])
        assert_within(grad, exp, bound + g_err * sigma, "compiled alpha grad vs the forward's noise")
        outs.append(out.detach().clone())
    for i in range(3):
        for j in range(i):
            assert not torch.equal(outs[i], outs[j]), (i, j)


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_reduce_overhead_fresh_noise(backend, monkeypatch):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) of a NoisyLinear: every call draws new noise."""
    torch._dynamo.reset()
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    layer = pni_fast.NoisyLinear(64, 32, pni="channelwise").to(DEV)
    x = torch.randn(8, 64, device=DEV)
    plain = F.linear(x, layer.weight, layer.bias).detach()
    compiled = torch.compile(layer, mode="reduce-overhead")
    outs = []
    with torch.no_grad():
        for _ in range(6):  # the first calls warm up and record, the later ones replay
            torch.compiler.cudagraph_mark_step_begin()
            outs.append(compiled(x).clone())
    for i, out in enumerate(outs):
        assert bool(torch.isfinite(out).all()) and not torch.allclose(out, plain), i
        for j in range(i):
            assert not torch.equal(out, outs[j]), f"calls {j} and {i} drew the same noise"


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend):
    w = torch.randn(256, 128, device=DEV)
    alpha = torch.full((256, 1), 0.25, device=DEV, requires_grad=True)
    ws, alphas = [w, w[:10]], [alpha, torch.full((1,), 0.1, device=DEV, requires_grad=True)]
    state = pni_fast.make_rng_state(7, DEV) if hasattr(pni_fast, "make_rng_state") else None

    def step():
        for seed in (99, None) + ((state,) if state is not None else ()):
            out = pni_fast.noisy_weight(w, alpha, seed=seed, backend=backend)
            out.sum().backward()
        outs = pni_fast.noisy_weights(ws, alphas, seed=98, backend=backend)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    step()  # compile / load / create the default RNG state outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# RNG state tensors and CUDA graphs
# ---------------------------------------------------------------------------


@needs_rng_state
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_rng_state_eager_semantics(device):
    """seed=state uses (state[0], state[1] + offset) and advances state[1] by the counters used."""
    if device == "cuda" and not ON_GPU:
        pytest.skip("no CUDA device")
    q = lambda t: (t.numel() + 3) // 4  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(10, 7, 9, generator=gen).to(device)
    w2 = torch.randn(5, 3, generator=gen).to(device)
    x = torch.randn(2, 3, 5, 5, generator=gen).to(device)
    g = torch.randn(w.shape, generator=gen).to(device)
    a = torch.full((10, 1, 1), 0.3, device=device)
    a2, ax = torch.full((1,), 0.2, device=device), torch.full((3,), 0.1, device=device)
    state = pni_fast.make_rng_state(SEED, device)
    assert state.dtype == torch.int64 and state.shape == (2,) and state.device.type == device
    assert state.tolist() == [SEED, 0]
    base = 0
    for _ in range(2):  # consecutive calls: consecutive counter ranges
        leaf, ref_leaf = a.clone().requires_grad_(), a.clone().requires_grad_()
        out = pni_fast.noisy_weight(w, leaf, seed=state)
        ref = pni_fast.noisy_weight(w, ref_leaf, seed=SEED, offset=base)
        assert torch.equal(out, ref)
        base += q(w)
        assert state.tolist() == [SEED, base]
        out.backward(g)  # the backward uses the snapshot taken before the advance
        ref.backward(g)
        assert torch.equal(leaf.grad, ref_leaf.grad)
    assert torch.equal(pni_fast.inject_noise(x, ax, seed=state), pni_fast.inject_noise(x, ax, seed=SEED, offset=base))
    base += q(x)
    outs = pni_fast.noisy_weights([w, w2], [a, a2], seed=state)
    assert torch.equal(outs[0], pni_fast.noisy_weight(w, a, seed=SEED, offset=base))
    assert torch.equal(outs[1], pni_fast.noisy_weight(w2, a2, seed=SEED, offset=base + q(w)))
    base += q(w) + q(w2)
    assert torch.equal(
        pni_fast.randn((5,), seed=state, device=device), pni_fast.randn((5,), seed=SEED, offset=base, device=device)
    )
    assert state.tolist() == [SEED, base + 2]


test_rng_state_eager_semantics.runs_on_cpu = True  # its cpu case needs no GPU


def _capture(step, warmup: int = 2):
    """Warm ``step`` up on a side stream, then capture one call into a CUDA graph; returns (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


def _assert_all_differ(tensors, what):
    for i in range(len(tensors)):
        for j in range(i):
            assert not torch.equal(tensors[i], tensors[j]), f"{what}: replays {j} and {i} are equal"


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_fixed_seed_replays_eager(backend):
    """A captured forward+backward with an int seed replays to the eager result (the same noise each time)."""
    w = torch.randn(64, 32, 3, 3, device=DEV, requires_grad=True)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)
    g = torch.randn(w.shape, device=DEV)

    def step():
        w.grad, alpha.grad = None, None
        out = pni_fast.noisy_weight(w, alpha, seed=77, backend=backend)
        out.backward(g)
        return out

    eager_out = step().detach().clone()
    eager_grad = alpha.grad.clone()
    graph, static_out = _capture(step)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager_out)
        assert torch.equal(alpha.grad, eager_grad)


@real_gpu
@needs_rng_state
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_rng_state_fresh_per_replay(backend):
    """noisy_weight(seed=state) forward+backward in a graph: each replay draws fresh noise, and the
    replays equal the eager sequence from a clone of the starting state, bit for bit."""
    w = torch.randn(64, 32, 3, 3, device=DEV)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)
    g = torch.randn(w.shape, device=DEV)
    state = pni_fast.make_rng_state(SEED, DEV)

    def step():
        alpha.grad = None
        out = pni_fast.noisy_weight(w, alpha, seed=state, backend=backend)
        out.backward(g)
        return out

    graph, static_out = _capture(step)
    start = torch.tensor([SEED, 2**32 - 5], dtype=torch.int64, device=DEV)
    state.copy_(start)  # in place: the graph reads this memory
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append((static_out.clone(), alpha.grad.clone()))
    torch.cuda.synchronize()
    assert state.tolist() == [SEED, 2**32 - 5 + 3 * ((w.numel() + 3) // 4)]
    eager_state = start.clone()
    for k, (out_r, grad_r) in enumerate(replays):
        leaf = alpha.detach().clone().requires_grad_()
        out = pni_fast.noisy_weight(w, leaf, seed=eager_state, backend=backend)
        out.backward(g)
        assert torch.equal(out_r, out), f"replay {k} differs from the eager call"
        assert torch.equal(grad_r, leaf.grad), f"replay {k}: alpha grad differs from the eager one"
    assert torch.equal(eager_state, state)
    _assert_all_differ([r[0] for r in replays], "outputs")


@real_gpu
@needs_rng_state
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_module_seed_none(backend, monkeypatch):
    """A NoisyConv2d (seed=None) captured with its backward: replays use the default RNG state."""
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    conv = pni_fast.NoisyConv2d(4, 8, 3, padding=1, pni="channelwise", noise="weight").to(DEV)
    x = torch.randn(2, 4, 8, 8, device=DEV)
    gout = torch.randn(2, 8, 8, 8, device=DEV)

    def step():
        for p in conv.parameters():
            p.grad = None
        out = conv(x)
        out.backward(gout)
        return out

    graph, static_out = _capture(step)  # the eager warm-up creates the default state
    state = pni_fast.default_rng_state(DEV)
    start = torch.tensor([SEED, 777], dtype=torch.int64, device=DEV)
    state.copy_(start)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append((static_out.clone(), conv.alpha_w.grad.clone()))
    torch.cuda.synchronize()
    assert state.tolist() == [SEED, 777 + 3 * ((conv.weight.numel() + 3) // 4)]
    eager_state = start.clone()
    for k, (out_r, grad_r) in enumerate(replays):
        leaf = conv.alpha_w.detach().clone().requires_grad_()
        wn = pni_fast.noisy_weight(conv.weight.detach(), leaf, seed=eager_state)
        out = F.conv2d(x, wn, conv.bias.detach(), padding=1)
        out.backward(gout)
        # cuDNN may pick other (deterministic) algorithms under capture: fp32-rounding close, while other
        # noise would move every output by ~alpha * sigma(w) relative (the bitwise check of the noise
        # itself is test_cuda_graph_rng_state_fresh_per_replay)
        torch.testing.assert_close(
            out_r,
            out,
            rtol=1e-5,
            atol=1e-5 * float(out.abs().max()),
            msg=lambda m: f"replay {k} differs from the eager call: {m}",
        )
        torch.testing.assert_close(
            grad_r,
            leaf.grad,
            rtol=1e-5,
            atol=1e-5 * float(leaf.grad.abs().max()),
            msg=lambda m: f"replay {k}: alpha grad differs from the eager one: {m}",
        )
    _assert_all_differ([r[0] for r in replays], "outputs")

    both = pni_fast.NoisyConv2d(4, 8, 3, padding=1, pni="channelwise", noise="both").to(DEV)
    graph, static_out = _capture(lambda: both(x))
    before = state[1].item()
    outs = []
    for _ in range(3):
        graph.replay()
        outs.append(static_out.clone())
    per_replay = (both.weight.numel() + 3) // 4 + (x.numel() + 3) // 4  # weight noise, then input noise
    assert state[1].item() == before + 3 * per_replay
    _assert_all_differ(outs, "weight + input noise outputs")


@real_gpu
@needs_cuda_ext
def test_cuda_graph_multi_tensor():
    """The CUDA list op passes its tensor table as kernel parameters, so it replays in a graph;
    with an RNG state every replay draws fresh noise, equal to the eager sequence."""
    ws = [torch.randn(16, 8, 3, 3, device=DEV), torch.randn(10, 64, device=DEV)]
    alphas = [torch.full((16, 1, 1, 1), 0.25, device=DEV), torch.full((1,), 0.1, device=DEV)]
    eager = pni_fast.noisy_weights(ws, alphas, seed=21, backend="cuda")
    graph, static = _capture(lambda: pni_fast.noisy_weights(ws, alphas, seed=21, backend="cuda"), warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)
    if not hasattr(pni_fast, "make_rng_state"):
        pytest.skip("pni_fast.make_rng_state is missing (op contract v2 not implemented)")
    state = pni_fast.make_rng_state(SEED, DEV)
    graph, static = _capture(lambda: pni_fast.noisy_weights(ws, alphas, seed=state, backend="cuda"), warmup=1)
    start = torch.tensor([SEED, 10], dtype=torch.int64, device=DEV)
    state.copy_(start)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([s.clone() for s in static])
    eager_state = start.clone()
    for k, rep in enumerate(replays):
        for a, b in zip(rep, pni_fast.noisy_weights(ws, alphas, seed=eager_state, backend="cuda")):
            assert torch.equal(a, b), k
    _assert_all_differ([r[0] for r in replays], "list outputs")


@real_gpu
@needs_triton
def test_triton_multi_refuses_graph_capture():
    _, _, _, multi, _ = gpu_ops("triton")
    v = torch.randn(100, device=DEV)
    args = ([v], [torch.ones(1, device=DEV)], [torch.tensor(1.0, device=DEV)], [1], [0], [1])
    multi(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            multi(*args)
