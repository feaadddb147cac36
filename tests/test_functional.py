"""noisy_weight / inject_noise / noisy_weights on every CPU backend against the reference math
with the oracle's noise, their gradients, the custom-op machinery, and bad input."""

import numpy as np
import pytest
import torch

import pni_fast
import pni_fast.functional as PF
from pni_fast.ops import registry
from pni_fast.reference import reference_inject_noise, reference_noisy_weight

import kernels
import oracle
from oracle import TOLERANCE

BACKENDS = kernels.backend_params("cpu")
WEIGHT_SHAPE = (8, 3, 3, 3)  # small: the Triton interpreter is slow


def _alpha(mode, weight, value=0.3):
    if mode == "layerwise":
        shape = (1,)
    elif mode == "channelwise":
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    else:
        shape = tuple(weight.shape)
    a = torch.full(shape, value, dtype=weight.dtype)
    # distinct per-channel values so a wrong channel mapping shows up
    a = a + 0.01 * torch.arange(a.numel(), dtype=weight.dtype).reshape(shape)
    return a


def _oracle_z(seed, offset, shape, dtype=torch.float64):
    return torch.from_numpy(oracle.normal(seed, offset, int(np.prod(shape)))).reshape(shape).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["layerwise", "channelwise", "elementwise"])
def test_noisy_weight_forward_and_grads_match_reference(backend, mode):
    torch.manual_seed(0)
    w = torch.randn(WEIGHT_SHAPE, dtype=torch.float64, requires_grad=True)
    a = _alpha(mode, w).requires_grad_()
    seed, offset = 31337, 5
    out = pni_fast.noisy_weight(w, a, seed=seed, offset=offset, backend=backend)

    w_ref = w.detach().clone().requires_grad_()
    a_ref = a.detach().clone().requires_grad_()
    ref = reference_noisy_weight(w_ref, a_ref, z=_oracle_z(seed, offset, WEIGHT_SHAPE))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    g = torch.randn_like(out)
    gw, ga = torch.autograd.grad(out, (w, a), g)
    rw, ra = torch.autograd.grad(ref, (w_ref, a_ref), g)
    torch.testing.assert_close(gw, rw, rtol=0, atol=0)  # identity
    assert ga.shape == a.shape
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha_shape", [(1,), (4,), (1, 4, 1, 1), (4, 5, 5)])
def test_inject_noise_matches_reference(backend, alpha_shape):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    a = (0.2 + 0.05 * torch.arange(int(np.prod(alpha_shape)), dtype=torch.float64)).reshape(alpha_shape)
    a.requires_grad_()
    out = pni_fast.inject_noise(x, a, seed=77, backend=backend)
    inner = 25 if len(alpha_shape) in (1, 4) and a.numel() == 4 else 1
    a_ref = a.detach().clone().requires_grad_()
    ref = reference_inject_noise(x, a_ref, inner=inner, z=_oracle_z(77, 0, x.shape))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, a, g)
    (ra,) = torch.autograd.grad(ref, a_ref, g)
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-4)


# Every backend shares the autograd wiring (pni_fast/ops/autograd.py); the modes differ only in alpha's layout,
# which the kernel tests check against the oracle. So the Triton interpreter (each gradcheck call costs
# seconds there) runs one mode, the channelwise one (inner > 1 and alpha tiling), on a smaller weight.
_GRADCHECK_CASES = [
    kernels.extend(b, m, id=m, marks=[pytest.mark.slow] if b.id == "triton" else [])
    for b in BACKENDS
    for m in ("layerwise", "channelwise", "elementwise")
    if b.id != "triton" or m == "channelwise"
]


@pytest.mark.parametrize("backend,mode", _GRADCHECK_CASES)
def test_gradcheck_float64(backend, mode):
    shape = (2, 3, 1, 2) if backend == "triton" else (4, 3, 2, 2)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a = _alpha(mode, w).requires_grad_()
    sigma = w.detach().std()
    inner = PF._weight_inner(w, a)
    PF.backend_for(backend, "cpu")  # registers this backend's ops and autograd (before reading torch.ops)
    fwd = getattr(torch.ops.pni_fast, registry.REGISTRY[backend].perturb).default
    assert torch.autograd.gradcheck(lambda w, a: fwd(w, a, sigma, 5, 2, inner), (w, a))
    assert torch.autograd.gradgradcheck(lambda w, a: fwd(w, a, sigma, 5, 2, inner), (w, a))
    # the public function (autograd.Function path) too; w is fixed there because sigma = std(w) is
    # detached by design (a finite difference in w would see sigma move)
    wd = w.detach()
    assert torch.autograd.gradgradcheck(lambda a: pni_fast.noisy_weight(wd, a, seed=5, offset=2, backend=backend), (a,))


@pytest.mark.parametrize("backend", kernels.backend_params("cpu", exclude=kernels.TRITON_ELSEWHERE))
def test_torch_compile_fullgraph_equals_eager(backend):
    torch._dynamo.reset()
    w = torch.randn(16, 8, requires_grad=True)
    a = torch.full((16, 1), 0.25, requires_grad=True)

    def step(w, a):
        return pni_fast.noisy_weight(w, a, seed=11, backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(w, a)
    grads_c = torch.autograd.grad(loss_c, (w, a))
    loss_e = step(w, a)
    grads_e = torch.autograd.grad(loss_e, (w, a))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_stores_no_noise(backend):
    """Autograd keeps alpha and sigma only: nothing of the weight's size is saved."""
    w = torch.randn(64, 32, requires_grad=True)
    a = torch.tensor([0.25], requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pni_fast.noisy_weight(w, a, seed=1, backend=backend)
    out.sum().backward()
    assert saved and max(saved) <= 1, saved
    # the reference does store a weight-sized noise tensor
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_noisy_weight(w, a)
    assert max(saved) == w.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bits(backend):
    w = torch.randn(33, 7)
    a = torch.full((33, 1), 0.3, requires_grad=True)
    runs = []
    for _ in range(2):
        out = pni_fast.noisy_weight(w, a, seed=5, backend=backend)
        (ga,) = torch.autograd.grad(out, a, torch.ones_like(out))
        runs.append((out, ga))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_backends_agree_on_noise():
    w = torch.randn(5, 7, 3)
    a = torch.tensor([0.4])
    outs = {b: pni_fast.noisy_weight(w, a, seed=99, backend=b) for b in kernels.runnable("cpu")}
    for b, o in outs.items():
        torch.testing.assert_close(o, outs["torch"], rtol=0, atol=2e-6 * 0.4 * float(w.std()) + 1e-6, msg=b)


def test_seed_none_uses_torch_generator():
    w = torch.randn(10, 10)
    a = torch.tensor([0.5])
    torch.manual_seed(3)
    o1 = pni_fast.noisy_weight(w, a)
    o2 = pni_fast.noisy_weight(w, a)
    torch.manual_seed(3)
    o3 = pni_fast.noisy_weight(w, a)
    assert torch.equal(o1, o3) and not torch.equal(o1, o2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_low_precision_inputs(backend, dtype):
    dt = getattr(torch, dtype)
    w32 = torch.randn(8, 12)
    w = w32.to(dt).requires_grad_()
    a = torch.full((8, 1), 0.25, dtype=dt, requires_grad=True)
    out = pni_fast.noisy_weight(w, a, seed=4, backend=backend)
    assert out.dtype == dt and out.shape == w.shape
    wf = w.detach().float()
    ref = wf + a.detach().float() * wf.std() * _oracle_z(4, 0, w.shape, torch.float32)
    tol = TOLERANCE[dtype] * 4
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    (ga,) = torch.autograd.grad(out, a, torch.ones_like(out))
    assert ga.dtype == dt
    ref_ga = (wf.std() * _oracle_z(4, 0, w.shape, torch.float32)).sum(dim=1, keepdim=True)
    torch.testing.assert_close(ga.float(), ref_ga, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_channels_last_follow_logical_order(backend):
    w = torch.randn(8, 4, 3, 3)
    a = torch.full((8, 1, 1, 1), 0.3)
    expected = pni_fast.noisy_weight(w, a, seed=8, backend=backend)
    cl = w.to(memory_format=torch.channels_last)
    torch.testing.assert_close(pni_fast.noisy_weight(cl, a, seed=8, backend=backend), expected, rtol=0, atol=0)
    t = w.reshape(8, 36).t().contiguous().t()  # same values, transposed storage
    got = pni_fast.noisy_weight(t, torch.full((8, 1), 0.3), seed=8, backend=backend)
    torch.testing.assert_close(got, expected.reshape(8, 36), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_tensors_unchanged(backend):
    w = torch.randn(6, 5)
    a = torch.full((6, 1), 0.3)
    w0, a0 = w.clone(), a.clone()
    pni_fast.noisy_weight(w, a, seed=1, backend=backend)
    pni_fast.inject_noise(w, a[:1, 0], seed=1, backend=backend)
    assert torch.equal(w, w0) and torch.equal(a, a0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_element(backend):
    e = torch.empty(0, 3)
    out = pni_fast.noisy_weight(e, torch.tensor([0.2]), seed=1, backend=backend)
    assert out.shape == (0, 3)
    one = torch.tensor([[1.5]], requires_grad=True)
    a = torch.tensor([0.2], requires_grad=True)
    out = pni_fast.noisy_weight(one, a, seed=1, backend=backend)
    assert torch.equal(out.detach(), one.detach())  # sigma of one element is defined as 0
    (ga,) = torch.autograd.grad(out.sum(), a)
    assert torch.equal(ga, torch.zeros_like(a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tensor_equals_single_calls(backend):
    torch.manual_seed(2)
    ws = [torch.randn(5, 3, 3, 3, requires_grad=True), torch.randn(7, 5, requires_grad=True), torch.randn(3)]
    ws[2].requires_grad_()
    alphas = [
        torch.tensor([0.2], requires_grad=True),
        torch.full((7, 1), 0.3, requires_grad=True),
        torch.full((3,), 0.4, requires_grad=True),
    ]
    outs = pni_fast.noisy_weights(ws, alphas, seed=21, backend=backend)
    offset = 0
    for w, a, o in zip(ws, alphas, outs):
        single = pni_fast.noisy_weight(w, a, seed=21, offset=offset, backend=backend)
        torch.testing.assert_close(o, single, rtol=0, atol=0)
        offset += -(-w.numel() // 4)
    loss = sum((o * o).sum() for o in outs[:2])  # the third output gets no gradient
    grads = torch.autograd.grad(loss, alphas[:2] + ws[:1])
    offset = 0
    for w, a, g in zip(ws[:2], alphas[:2], grads[:2]):
        single = pni_fast.noisy_weight(w, a, seed=21, offset=offset, backend=backend)
        (ref,) = torch.autograd.grad((single * single).sum(), a)
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
        offset += -(-w.numel() // 4)


def test_env_var_selects_and_validates_backend(monkeypatch):
    w, a = torch.randn(4, 4), torch.tensor([0.1])
    monkeypatch.setenv("PNI_FAST_BACKEND", "torch")
    torch.testing.assert_close(
        pni_fast.noisy_weight(w, a, seed=1), pni_fast.noisy_weight(w, a, seed=1, backend="torch"), rtol=0, atol=0
    )
    monkeypatch.setenv("PNI_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="PNI_FAST_BACKEND"):
        pni_fast.noisy_weight(w, a, seed=1)


W = torch.randn(4, 3)
BAD_CASES = [
    (dict(weight=torch.ones(4, 3, dtype=torch.int64), alpha=torch.tensor([1])), TypeError, "weight must be float"),
    (dict(weight=torch.ones(4, 3, dtype=torch.bool), alpha=torch.tensor([0.1])), TypeError, "weight must be float"),
    (dict(weight=W, alpha=0.25), TypeError, "alpha must be a torch.Tensor"),
    (dict(weight=W, alpha=torch.full((3, 1), 0.1)), ValueError, r"alpha must have 1 element"),
    (dict(weight=W, alpha=torch.full((4, 2), 0.1)), ValueError, r"channelwise"),
    (
        dict(weight=W, alpha=torch.tensor([0.1], dtype=torch.float64)),
        TypeError,
        r"alpha must have dtype torch.float32 \(the dtype of weight\)",
    ),
    (dict(weight=W, alpha=torch.tensor([0.1], device="meta")), ValueError, "alpha must be on weight's device"),
    (dict(weight=W, alpha=torch.empty(0)), ValueError, "at least one element"),
    (dict(weight=W, alpha=torch.tensor([0.1]), seed=-5), ValueError, "seed"),
    (dict(weight=W, alpha=torch.tensor([0.1]), seed=2**63), ValueError, "seed"),
    (dict(weight=W, alpha=torch.tensor([0.1]), seed=1, offset=-1), ValueError, "offset"),
    (dict(weight=W, alpha=torch.tensor([0.1]), seed=1, offset=0.5), TypeError, "offset"),
    (dict(weight=W, alpha=torch.tensor([0.1]), backend="nope"), ValueError, "backend must be one of"),
    (dict(weight=W, alpha=torch.tensor([0.1]), backend="cuda"), RuntimeError, "backend='cuda' cannot run"),
    (dict(weight=torch.tensor([[1.0, float("nan")]]), alpha=torch.tensor([0.1])), ValueError, "NaN or Inf"),
    (dict(weight=torch.tensor([[1.0, float("inf")]]), alpha=torch.tensor([0.1])), ValueError, "NaN or Inf"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CASES)
def test_noisy_weight_bad_input(kwargs, exc, match):
    kwargs = dict(kwargs)
    weight, alpha = kwargs.pop("weight"), kwargs.pop("alpha")
    with pytest.raises(exc, match=match):
        pni_fast.noisy_weight(weight, alpha, **kwargs)


def test_inject_noise_bad_alpha_shape():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="x.shape\\[1\\]"):
        pni_fast.inject_noise(x, torch.full((3,), 0.1), seed=1)
    with pytest.raises(ValueError, match="x.shape\\[1\\]"):
        pni_fast.inject_noise(x, torch.full((1, 1, 4), 0.1), seed=1)


def test_noisy_weights_bad_input():
    with pytest.raises(ValueError, match="same length"):
        pni_fast.noisy_weights([W], [])
    assert pni_fast.noisy_weights([], []) == []
    with pytest.raises(ValueError, match="one device"):
        pni_fast.noisy_weights([W, W.to("meta")], [torch.tensor([0.1])] * 2)
