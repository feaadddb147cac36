"""GPU tests: the CUDA C++ kernels and the Triton kernels on a real device.

Skipped with "no CUDA device" on machines without a GPU (the Triton kernels are then covered
by tests/test_triton.py under the interpreter and the CUDA sources by tests/test_cuda_compile.py).
Every backend is compared with the numpy Philox oracle (z within 2e-6, words and uniforms
bit-exact), with float64 math on the oracle's z, and with the paper-faithful reference.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

import philox_oracle as oracle  # noqa: E402

import pni_fast  # noqa: E402
from pni_fast import _ext  # noqa: E402
from pni_fast.reference import reference_noisy_weight  # noqa: E402

ops = torch.ops.pni_fast
DEV = "cuda"
SEED = 0x0DDB_A11_5EED  # > 2^32
OFFSET = 2**32 - 100  # counters cross the 32-bit boundary of c0/c1


def _has_cuda_ext() -> bool:
    return torch.cuda.is_available() and _ext.load() and _ext.has_cuda()


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


needs_cuda_ext = pytest.mark.skipif(
    not _has_cuda_ext(),
    reason="no CUDA device" if not torch.cuda.is_available() else "pni_fast was built without CUDA kernels",
)
needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton is not installed")

GPU_BACKENDS = [
    pytest.param("cuda", marks=needs_cuda_ext),
    pytest.param("triton", marks=needs_triton),
]
OPS = {  # backend -> (noise, perturb, alpha grad, multi, alpha grad multi)
    "cuda": ("noise", "perturb", "perturb_alpha_grad", "perturb_multi", "perturb_alpha_grad_multi"),
    "triton": ("noise_triton", "perturb_triton", "perturb_alpha_grad_triton", "perturb_multi_triton",
               "perturb_alpha_grad_multi_triton"),
}

# (shape, alpha numel, inner): every alpha mode and every stage-1 path of the CUDA kernel
# (thread mode for inner < 64, warp mode with one and several chunks, direct elementwise).
CASES = {
    "layerwise-small": ((7,), 1, 1),
    "layerwise-large": ((100_003,), 1, 1),
    "conv-channelwise": ((16, 8, 3, 3), 16, 72),
    "linear-channelwise-long": ((3, 5000), 3, 5000),
    "aligned-rows": ((2, 2048), 2, 2048),
    "elementwise": ((33, 7), 231, 1),
    "act-channelwise-7x7": ((4, 6, 7, 7), 6, 49),
    "act-channelwise-4x4": ((3, 4, 4, 4), 4, 16),
    "act-channelwise-32x32": ((2, 3, 32, 32), 3, 1024),
    "act-per-feature": ((9, 13), 13, 1),
}
TOL = {torch.float32: (2e-6, 2e-5), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 1e-2),
       torch.bfloat16: (2e-2, 5e-2)}  # (out, grad)


def _ops(backend: str):
    if backend == "triton":
        import pni_fast.triton  # noqa: F401  (registers the *_triton ops)
    return [getattr(ops, name) for name in OPS[backend]]


def _z64(numel, seed=SEED, offset=OFFSET) -> torch.Tensor:
    return torch.from_numpy(oracle.normal(seed, offset, numel)).double()


def _index(numel, n_alpha, inner) -> torch.Tensor:
    return (torch.arange(numel) // inner) % n_alpha


def _expected_out(v, alpha, sigma, inner, seed=SEED, offset=OFFSET):
    n = v.numel()
    a = alpha.double().reshape(-1).cpu()[_index(n, alpha.numel(), inner)]
    return v.double().reshape(-1).cpu() + a * float(sigma) * _z64(n, seed, offset)


def _expected_grad(g, alpha, sigma, inner, seed=SEED, offset=OFFSET):
    n = g.numel()
    out = torch.zeros(alpha.numel(), dtype=torch.float64)
    out.index_add_(0, _index(n, alpha.numel(), inner), g.double().reshape(-1).cpu() * _z64(n, seed, offset))
    return out * float(sigma)


def _inputs(shape, n_alpha, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen).to(dtype).to(DEV)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEV)
    alpha = (torch.rand(n_alpha, generator=gen) + 0.1).to(dtype).to(DEV)
    return v, g, alpha, torch.tensor(0.75, device=DEV)


# ---------------------------------------------------------------------------
# RNG agreement across backends
# ---------------------------------------------------------------------------


def test_noise_agrees_across_backends():
    """CUDA, Triton, CPU and pure-PyTorch z for one (seed, offset) vs the oracle, within 2e-6."""
    n = 10_007
    expected = oracle.normal(SEED, OFFSET, n)
    got = {"torch-cpu": pni_fast.randn((n,), seed=SEED, offset=OFFSET, device="cpu", backend="torch"),
           "torch-cuda": pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend="torch")}
    if _ext.load():
        got["cpu"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device="cpu", backend="cpu")
    if _has_cuda_ext():
        got["cuda"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend="cuda")
    if _has_triton():
        got["triton"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend="triton")
    for name, z in got.items():
        assert z.dtype == torch.float32 and z.shape == (n,), name
        err = np.abs(z.cpu().numpy().astype(np.float64) - expected).max()
        assert err <= 2e-6, f"{name}: max |z - oracle| = {err:.3g}"


@needs_cuda_ext
@pytest.mark.parametrize("numel", [1, 5, 4096, 10_001])
def test_cuda_words_and_uniforms_bit_exact(numel):
    like = torch.empty(numel, device=DEV)
    words = ops.rng_words(like, SEED, OFFSET).cpu().numpy().view(np.uint32)
    np.testing.assert_array_equal(words, oracle.words(SEED, OFFSET, numel))
    uni = ops.rng_uniform(like, SEED, OFFSET).cpu().numpy()
    np.testing.assert_array_equal(uni, oracle.uniform(oracle.words(SEED, OFFSET, numel)))


@needs_cuda_ext
def test_cuda_noise_large_tensor():
    n = (1 << 22) + 3
    z = ops.noise(torch.empty(n, device=DEV), 11, 5).cpu().numpy()
    idx = np.r_[0:1000, n - 1000:n]
    full = oracle.normal(11, 5, n)
    assert np.abs(z[idx] - full[idx]).max() <= 2e-6
    assert abs(z.mean()) < 2e-3 and abs(z.var() - 1) < 3e-3


# ---------------------------------------------------------------------------
# perturb / alpha grad vs float64 math
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_perturb_and_alpha_grad(backend, dtype, case):
    _, perturb, alpha_grad, _, _ = _ops(backend)
    shape, n_alpha, inner = CASES[case]
    v, g, alpha, sigma = _inputs(shape, n_alpha, dtype)
    out_tol, grad_tol = TOL[dtype]
    out = perturb(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.shape == v.shape and out.dtype == dtype and out.device == v.device
    torch.testing.assert_close(out.double().reshape(-1).cpu(), _expected_out(v, alpha, sigma, inner),
                               rtol=out_tol, atol=out_tol)
    grad = alpha_grad(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.shape == alpha.shape and grad.dtype == dtype
    expected = _expected_grad(g, alpha, sigma, inner)
    scale = 1.0 + expected.abs().max().item()
    torch.testing.assert_close(grad.double().cpu() / scale, expected / scale, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sigma_in_value_dtype_and_empty(backend):
    _, perturb, alpha_grad, _, _ = _ops(backend)
    v, g, alpha, _ = _inputs((5, 40), 5, torch.float16)
    sigma = torch.tensor(0.5, dtype=torch.float16, device=DEV)
    out = perturb(v, alpha, sigma, 1, 2, 40)
    torch.testing.assert_close(out.double().reshape(-1).cpu(), _expected_out(v, alpha, sigma, 40, 1, 2),
                               rtol=2e-3, atol=2e-3)
    empty = torch.empty(0, 3, device=DEV)
    one = torch.ones(1, device=DEV)
    s = torch.tensor(1.0, device=DEV)
    assert perturb(empty, one, s, 1, 0, 1).shape == (0, 3)
    assert alpha_grad(empty, one, s, 1, 0, 1).item() == 0.0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_alpha_grad_deterministic(backend):
    _, _, alpha_grad, _, _ = _ops(backend)
    for shape, n_alpha, inner in [((1 << 20,), 1, 1), ((64, 32, 3, 3), 64, 288), ((8, 16, 14, 14), 16, 196)]:
        _, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32)
        first = alpha_grad(g, alpha, sigma, 3, 0, inner)
        for _ in range(3):
            assert torch.equal(alpha_grad(g, alpha, sigma, 3, 0, inner), first)


def test_cuda_matches_triton():
    if not (_has_cuda_ext() and _has_triton()):
        pytest.skip("needs both the CUDA extension and triton")
    shape, n_alpha, inner = CASES["conv-channelwise"]
    v, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32)
    cu, tr = _ops("cuda"), _ops("triton")
    torch.testing.assert_close(cu[1](v, alpha, sigma, 4, 9, inner), tr[1](v, alpha, sigma, 4, 9, inner),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(cu[2](g, alpha, sigma, 4, 9, inner), tr[2](g, alpha, sigma, 4, 9, inner),
                               rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# Public API: forward/backward vs the paper-faithful reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["layerwise", "channelwise", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noisy_weight_vs_reference(backend, mode, dtype):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, 16, 3, 3, generator=gen).to(dtype)
    shape = {"layerwise": (1,), "channelwise": (32, 1, 1, 1), "elementwise": tuple(w0.shape)}[mode]
    a0 = torch.full(shape, 0.25, dtype=dtype)
    g = torch.randn(w0.shape, generator=gen).to(dtype)
    w = w0.clone().to(DEV).requires_grad_()
    alpha = a0.clone().to(DEV).requires_grad_()
    out = pni_fast.noisy_weight(w, alpha, seed=SEED, offset=3, backend=backend)
    out.backward(g.to(DEV))

    w_ref = w0.double().requires_grad_()
    a_ref = a0.double().requires_grad_()
    z = torch.from_numpy(oracle.normal(SEED, 3, w0.numel())).double().reshape(w0.shape)
    ref = reference_noisy_weight(w_ref, a_ref, z)
    ref.backward(g.double())
    out_tol, grad_tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=out_tol, atol=4 * out_tol)
    torch.testing.assert_close(w.grad.cpu(), g)  # identity
    scale = 1.0 + a_ref.grad.abs().max().item()
    torch.testing.assert_close(alpha.grad.double().cpu() / scale, a_ref.grad / scale, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inject_noise_channelwise(backend):
    x = torch.randn(4, 6, 7, 7, device=DEV)
    alpha = torch.full((6,), 0.3, device=DEV, requires_grad=True)
    out = pni_fast.inject_noise(x, alpha, seed=5, offset=0, backend=backend)
    sigma = x.std()
    expected = _expected_out(x, alpha.detach(), sigma, 49, 5, 0)
    torch.testing.assert_close(out.double().reshape(-1).cpu(), expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(x)
    out.backward(g)
    torch.testing.assert_close(alpha.grad.double().cpu(), _expected_grad(g, alpha.detach(), sigma, 49, 5, 0),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Multi-tensor ops
# ---------------------------------------------------------------------------


def _model_like_lists(count: int):
    """A list like a CIFAR ResNet's noisy weights: mixed modes, one fp16 tensor, one empty tensor."""
    specs = [((16, 3, 3, 3), "channelwise"), ((16, 16, 3, 3), "layerwise"), ((32, 16, 3, 3), "elementwise"),
             ((64, 32, 3, 3), "channelwise"), ((10, 64), "layerwise")]
    vs, gs, alphas, sigmas, offsets, inners = [], [], [], [], [], []
    offset = 0
    gen = torch.Generator().manual_seed(2)
    for i in range(count):
        shape, mode = specs[i % len(specs)]
        dtype = torch.float16 if i == 3 else torch.float32
        v = torch.randn(shape, generator=gen).to(dtype).to(DEV)
        n_alpha, inner = {"layerwise": (1, 1), "channelwise": (shape[0], v.numel() // shape[0]),
                          "elementwise": (v.numel(), 1)}[mode]
        vs.append(v)
        gs.append(torch.randn(shape, generator=gen).to(dtype).to(DEV))
        alphas.append((torch.rand(n_alpha, generator=gen) + 0.1).to(dtype).to(DEV))
        sigmas.append(v.float().std())
        offsets.append(offset)
        inners.append(inner)
        offset += (v.numel() + 3) // 4
    vs.append(torch.empty(0, device=DEV)), gs.append(torch.empty(0, device=DEV))
    alphas.append(torch.ones(1, device=DEV)), sigmas.append(torch.tensor(0.0, device=DEV))
    offsets.append(offset), inners.append(1)
    return vs, gs, alphas, sigmas, offsets, inners


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("count", [5, 45])  # 45 > 32 tensors: the CUDA op splits the launch
def test_multi_equals_single(backend, count):
    _, perturb, alpha_grad, multi, grad_multi = _ops(backend)
    vs, gs, alphas, sigmas, offsets, inners = _model_like_lists(count)
    outs = multi(vs, alphas, sigmas, SEED, offsets, inners)
    grads = grad_multi(gs, alphas, sigmas, SEED, offsets, inners)
    for i, (v, g, a, s, o, n) in enumerate(zip(vs, gs, alphas, sigmas, offsets, inners)):
        assert torch.equal(outs[i], perturb(v, a, s, SEED, o, n)), i
        single = alpha_grad(g, a, s, SEED, o, n)
        if backend == "cuda":
            assert torch.equal(grads[i], single), i  # same kernels, same partial order
        else:  # one scan-based reduction for every tensor: fp32 sums may differ in the last bits
            tol = 2e-5 if a.dtype == torch.float32 else 2e-3  # fp16: one ulp after rounding
            torch.testing.assert_close(grads[i], single, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_noisy_weights_backward(backend):
    vs, gs, alphas, _, _, _ = _model_like_lists(5)
    vs, gs, alphas = vs[:-1], gs[:-1], alphas[:-1]
    alphas = [a.reshape(v.shape) if a.numel() == v.numel() else
              (a.reshape((-1,) + (1,) * (v.dim() - 1)) if a.numel() > 1 else a) for v, a in zip(vs, alphas)]
    leaves = [a.clone().requires_grad_() for a in alphas]
    outs = pni_fast.noisy_weights(vs, leaves, seed=SEED, backend=backend)
    torch.autograd.backward(outs, gs)
    singles = []
    offset = 0
    for v, a, g in zip(vs, alphas, gs):
        leaf = a.clone().requires_grad_()
        out = pni_fast.noisy_weight(v, leaf, seed=SEED, offset=offset, backend=backend)
        out.backward(g)
        singles.append(leaf.grad)
        offset += (v.numel() + 3) // 4
    for leaf, ref in zip(leaves, singles):
        tol = 2e-5 if ref.dtype == torch.float32 else 2e-3
        torch.testing.assert_close(leaf.grad, ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# torch.compile, no host sync, CUDA graphs
# ---------------------------------------------------------------------------


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
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-4)


@needs_triton
def test_torch_compile_triton_op_directly():
    _, perturb, _, _, _ = _ops("triton")
    v, _, alpha, sigma = _inputs((1000, 3), 1, torch.float32)
    f = torch.compile(lambda v, a, s: perturb(v, a, s, 7, 0, 1) * 2, fullgraph=True)
    torch.testing.assert_close(f(v, alpha, sigma), perturb(v, alpha, sigma, 7, 0, 1) * 2)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend):
    w = torch.randn(256, 128, device=DEV)
    alpha = torch.full((256, 1), 0.25, device=DEV, requires_grad=True)
    ws, alphas = [w, w[:10]], [alpha, torch.full((1,), 0.1, device=DEV, requires_grad=True)]

    def step():
        out = pni_fast.noisy_weight(w, alpha, seed=99, backend=backend)
        out.sum().backward()
        outs = pni_fast.noisy_weights(ws, alphas, seed=98, backend=backend)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    step()  # compile / load outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_forward_backward(backend):
    """A captured forward+backward replays to the eager result (fixed seed: same noise every replay)."""
    w = torch.randn(64, 32, 3, 3, device=DEV, requires_grad=True)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)
    g = torch.randn(w.shape, device=DEV)

    def step():
        out = pni_fast.noisy_weight(w, alpha, seed=77, backend=backend)
        out.backward(g)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            eager = step()
            w.grad, alpha.grad = None, None
    torch.cuda.current_stream().wait_stream(side)
    eager_out = eager.detach().clone()
    step()
    eager_grad = alpha.grad.clone()
    w.grad, alpha.grad = None, None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager_out)
    torch.testing.assert_close(alpha.grad, eager_grad)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend):
    pni_fast.randn((4,), seed=1, device=DEV, backend=backend)  # registers fakes / autograd
    _, perturb, alpha_grad, _, _ = _ops(backend)
    v, g, alpha, sigma = _inputs((8, 3, 3, 3), 8, torch.float32)
    torch.library.opcheck(perturb.default, (v, alpha, sigma, 1, 0, 27))
    torch.library.opcheck(alpha_grad.default, (g, alpha, sigma, 1, 0, 27))


@needs_cuda_ext
def test_cuda_graph_multi_tensor():
    """The CUDA list op passes its tensor table as kernel parameters, so it replays in a graph."""
    ws = [torch.randn(16, 8, 3, 3, device=DEV), torch.randn(10, 64, device=DEV)]
    alphas = [torch.full((16, 1, 1, 1), 0.25, device=DEV), torch.full((1,), 0.1, device=DEV)]
    eager = pni_fast.noisy_weights(ws, alphas, seed=21, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pni_fast.noisy_weights(ws, alphas, seed=21, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = pni_fast.noisy_weights(ws, alphas, seed=21, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


@needs_triton
def test_triton_multi_refuses_graph_capture():
    _, _, _, multi, _ = _ops("triton")
    v = torch.randn(100, device=DEV)
    args = ([v], [torch.ones(1, device=DEV)], [torch.tensor(1.0, device=DEV)], 1, [0], [1])
    multi(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            multi(*args)
