"""Property-based tests: for generated shapes, strides, dtypes, alpha modes, seeds and offsets, every public
function equals the pure-PyTorch backend (same noise contract) or raises a documented error, and never
modifies its inputs. Bounded: a fixed number of examples, no deadline, CI-sized tensors."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pni_fast  # noqa: E402

import kernels  # noqa: E402

# the fused backends against the pure-PyTorch one (the reference here); triton: tests/backends/test_triton.py
FAST = kernels.backend_params("cpu", exclude=("torch",) + kernels.TRITON_ELSEWHERE)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

sizes = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 13, 31, 64, 97])
seeds = st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1]) | st.integers(0, 2**63 - 1)
offsets = st.sampled_from([0, 1, 2**32 - 2, 2**32 - 1, 2**32, 2**62]) | st.integers(0, 2**40)


@st.composite
def tensors(draw, min_dim=1):
    """A float tensor that may be non-contiguous, expanded, channels_last or a view with a storage offset."""
    dtype = draw(st.sampled_from(DTYPES))
    dims = draw(st.integers(min_dim, 4))
    shape = [draw(sizes) if d == 0 else draw(st.sampled_from([1, 2, 3, 5])) for d in range(dims)]
    layout = draw(st.sampled_from(["contiguous", "transposed", "offset", "expanded", "channels_last", "strided"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "transposed" and dims >= 2:
        base = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(dtype).transpose(0, dims - 1)
    elif layout == "offset":
        flat = torch.randn(math.prod(shape) + 3, generator=gen, dtype=torch.float64).to(dtype)
        base = flat[3:].reshape(shape)
    elif layout == "expanded" and shape[-1] > 0:
        base = base[..., :1].expand(*shape)
    elif layout == "channels_last" and dims == 4:
        base = base.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.randn([s * 2 for s in shape], generator=gen, dtype=torch.float64).to(dtype)
        base = big[tuple(slice(0, None, 2) for _ in shape)]
    return base


def _alpha_for(w: torch.Tensor, mode: str, dtype) -> torch.Tensor:
    if mode == "layerwise" or w.dim() == 0:
        shape = (1,)
    elif mode == "channelwise":
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    else:
        shape = tuple(w.shape)
    n = max(1, math.prod(shape))
    return (0.1 + 0.01 * torch.arange(n, dtype=torch.float64)).reshape(shape).to(dtype)


def _same(a, b, dtype):
    torch.testing.assert_close(a.double(), b.double(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(
    w=tensors(),
    mode=st.sampled_from(["layerwise", "channelwise", "elementwise"]),
    seed=seeds,
    offset=offsets,
    fp32_alpha=st.booleans(),
)
def test_noisy_weight_equals_torch_backend(backend, w, mode, seed, offset, fp32_alpha):
    if w.shape[0] == 0 and mode != "layerwise":
        return  # no channel to attach alpha to
    adtype = torch.float32 if fp32_alpha and w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    a = _alpha_for(w, mode, adtype).requires_grad_()
    w0, a0 = w.clone(), a.detach().clone()
    quads = -(-w.numel() // 4)
    if offset + quads >= 2**63:
        with pytest.raises(ValueError, match="2\\*\\*63"):
            pni_fast.noisy_weight(w, a, seed=seed, offset=offset, backend=backend)
        return
    out = pni_fast.noisy_weight(w, a, seed=seed, offset=offset, backend=backend)
    a_t = a.detach().clone().requires_grad_()
    ref = pni_fast.noisy_weight(w, a_t, seed=seed, offset=offset, backend="torch")
    assert out.shape == w.shape and out.dtype == w.dtype
    _same(out, ref, w.dtype)
    g = torch.ones_like(out)
    (ga,) = torch.autograd.grad(out, a, g)
    (gr,) = torch.autograd.grad(ref, a_t, g)
    assert ga.dtype == a.dtype
    scale = max(1.0, float(gr.abs().max())) if gr.numel() else 1.0
    torch.testing.assert_close(ga.double() / scale, gr.double() / scale, rtol=0, atol=5 * TOL[w.dtype])
    assert torch.equal(w, w0) and torch.equal(a.detach(), a0)


@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(x=tensors(min_dim=2), per_channel=st.booleans(), seed=seeds)
def test_inject_noise_equals_torch_backend(backend, x, per_channel, seed):
    a = (torch.full((x.shape[1],), 0.2) if per_channel and x.shape[1] > 0 else torch.tensor([0.3])).to(x.dtype)
    x0 = x.clone()
    out = pni_fast.inject_noise(x, a, seed=seed, backend=backend)
    ref = pni_fast.inject_noise(x, a, seed=seed, backend="torch")
    _same(out, ref, x.dtype)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("backend", FAST)
@SETTINGS
@given(n=st.integers(0, 300), seed=seeds, offset=offsets)
def test_randn_equals_torch_backend(backend, n, seed, offset):
    if offset + -(-n // 4) >= 2**63:
        return
    z = pni_fast.randn((n,), seed=seed, offset=offset, backend=backend)
    r = pni_fast.randn((n,), seed=seed, offset=offset, backend="torch")
    torch.testing.assert_close(z, r, rtol=0, atol=2e-6)


@SETTINGS
@given(ws=st.lists(tensors(), min_size=1, max_size=5), seed=seeds)
def test_noisy_weights_equals_single_calls(ws, seed):
    ws = [w.float() for w in ws]
    alphas = [torch.tensor([0.2]) for _ in ws]
    outs = pni_fast.noisy_weights(ws, alphas, seed=seed)
    offset = 0
    for w, a, o in zip(ws, alphas, outs):
        assert torch.equal(o, pni_fast.noisy_weight(w, a, seed=seed, offset=offset))
        offset += -(-w.numel() // 4)
