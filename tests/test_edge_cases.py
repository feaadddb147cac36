"""Edge cases that must give the documented answer or a clear error on every CPU backend."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import pni_fast
from pni_fast.contract import message
from pni_fast.ops import sigma as sigma_ops

import kernels

BACKENDS = kernels.backend_params("cpu", exclude=kernels.TRITON_ELSEWHERE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_alpha_gradient_with_half_tensors_does_not_overflow(backend, dtype):
    """Exact alpha gradient far beyond the fp16 range (65504): float32 alpha gets a finite, correct float32 grad."""
    n = 1_500_000
    torch.manual_seed(0)
    x = torch.randn(n).to(dtype)
    a = torch.tensor([0.3], requires_grad=True)  # float32, as AMP keeps parameters
    out = pni_fast.inject_noise(x, a, seed=11, backend=backend)
    assert out.dtype == dtype
    z = pni_fast.randn((n,), seed=11, backend=backend).double()
    g = z.to(dtype)  # gradient aligned with the noise: sum(g * sigma * z) ~ n * sigma
    (ga,) = torch.autograd.grad(out, a, g)
    exact = float(pni_fast.weight_sigma(x)) * float((g.double() * z).sum())
    assert abs(exact) > 65504 * 10
    assert ga.dtype == torch.float32 and torch.isfinite(ga).all()
    assert abs(ga.item() - exact) <= 1e-4 * abs(exact)


def test_modules_keep_float32_alpha_under_autocast():
    layer = pni_fast.NoiseInjection(4, pni="channelwise")
    x = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    out = layer(x)
    out.float().sum().backward()
    assert layer.alpha.grad.dtype == torch.float32 and torch.isfinite(layer.alpha.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_of_other_float_dtype_is_refused(backend):
    with pytest.raises(TypeError, match="alpha must have dtype torch.float64"):
        pni_fast.noisy_weight(torch.randn(4, 4, dtype=torch.float64), torch.tensor([0.1]), seed=1, backend=backend)


def test_sigma_has_one_definition_whatever_is_loaded():
    """The first call in a fresh process (extension not yet loaded) gives the bits of later calls, and the
    pure-PyTorch sigma equals the C++ one."""
    code = (
        "import torch, pni_fast\n"
        "torch.manual_seed(0)\n"
        "ts = [torch.randn(int(n)) * 3 for n in torch.randint(2, 5000, (300,))]\n"
        "first = [pni_fast.weight_sigma(t) for t in ts]\n"
        "later = [pni_fast.weight_sigma(t) for t in ts]\n"
        "from pni_fast.ops.sigma import sigma_torch\n"
        "pure = [sigma_torch(t) for t in ts]\n"
        "print(all(torch.equal(a, b) for a, b in zip(first, later)),\n"
        "      all(torch.equal(a, b) for a, b in zip(first, pure)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float64, 1e200)])
def test_sigma_of_huge_finite_tensors_is_finite(dtype, scale):
    torch.manual_seed(1)
    base = torch.randn(1000, dtype=torch.float64)
    t = (base * scale).to(dtype)
    s = pni_fast.weight_sigma(t)
    expect = (t.double() / scale).std() * scale
    assert torch.isfinite(s)
    assert abs(float(s) - float(expect)) <= 1e-6 * float(expect)
    out = pni_fast.noisy_weight(t, torch.tensor([0.1], dtype=dtype), seed=1)  # not refused as "NaN or Inf"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_fresh_tensors_so_inplace_relu_works(backend, monkeypatch):
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    model = torch.nn.Sequential(pni_fast.NoiseInjection(), torch.nn.ReLU(inplace=True))
    x = torch.randn(3, 4, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None
    out = pni_fast.noisy_weight(x.detach(), torch.tensor([0.2]), seed=1, backend=backend)
    assert out._base is None and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_weight_with_channelwise_alpha(backend, monkeypatch):
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    layer = pni_fast.NoisyLinear(0, 4, pni="channelwise")
    ref = torch.nn.Linear(0, 4)
    x = torch.randn(2, 0)
    out = layer(x)
    assert out.shape == ref(x).shape == (2, 4)
    out.sum().backward()
    assert torch.equal(layer.alpha_w.grad, torch.zeros(4, 1))


@pytest.mark.parametrize("backend", kernels.backend_params("cpu") + [pytest.param("auto", id="auto")])
@pytest.mark.parametrize("pni", ["channelwise", "elementwise"])
def test_zero_output_layers_take_their_zero_size_alpha(backend, pni, monkeypatch):
    """docs/ops.md: a zero-size tensor is valid with any alpha shape its layer would have, here the
    zero-size alpha of a layer with 0 output channels; forward and backward run, alpha's gradient is
    zero-size too."""
    if backend == "auto":
        monkeypatch.delenv("PNI_FAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    layer = pni_fast.NoisyLinear(4, 0, pni=pni, noise="both")
    assert layer.alpha_w.numel() == 0
    x = torch.randn(2, 4, requires_grad=True)
    out = layer(x)
    assert out.shape == torch.nn.Linear(4, 0)(x).shape == (2, 0)
    (out.sum() + x.sum()).backward()
    assert layer.alpha_w.grad.shape == layer.alpha_w.shape and layer.alpha_i.grad is not None

    chosen = None if backend == "auto" else backend
    w = torch.randn(0, 3, 3, 3, requires_grad=True)
    a = torch.full((0, 1, 1, 1) if pni == "channelwise" else (0, 3, 3, 3), 0.25, requires_grad=True)
    out = pni_fast.noisy_weight(w, a, seed=5, backend=chosen)
    assert out.shape == w.shape
    out.sum().backward()
    assert a.grad.shape == a.shape and w.grad.shape == w.shape

    w1, a1 = torch.randn(5, 3, requires_grad=True), torch.full((5, 1), 0.25, requires_grad=True)
    a.grad = None
    outs = pni_fast.noisy_weights([w1, w], [a1, a], seed=5, backend=chosen)
    assert [o.shape for o in outs] == [w1.shape, w.shape]
    sum(o.sum() for o in outs).backward()
    assert a.grad.shape == a.shape and a1.grad.shape == a1.shape

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 0))
    pni_fast.convert(model, pni=pni)  # batched weight noise: one multi-tensor call for both layers
    model(torch.randn(2, 4)).sum().backward()
    assert model[1].alpha_w.grad.shape == model[1].alpha_w.shape == (0, 1 if pni == "channelwise" else 3)


def test_zero_output_conv_behaves_like_nn_conv2d():
    """NoisyConv2d(3, 0, 3) does what nn.Conv2d(3, 0, 3) does (torch 2.13 on CPU: its own conv error, not
    pni_fast's alpha check)."""
    x = torch.rand(1, 3, 5, 5)
    try:
        expected = torch.nn.Conv2d(3, 0, 3)(x).shape
    except RuntimeError as e:
        expected = e
    layer = pni_fast.NoisyConv2d(3, 0, 3, pni="channelwise")
    if isinstance(expected, Exception):
        with pytest.raises(type(expected)) as got:
            layer(x)
        assert str(got.value) == str(expected)
    else:
        assert layer(x).shape == expected


def test_empty_alpha_still_refused_for_a_nonempty_tensor():
    with pytest.raises(ValueError, match=r"alpha must have at least one element \(unless weight is zero-size\)"):
        pni_fast.noisy_weight(torch.randn(2, 3), torch.empty(0, 1), seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_limit_is_one_rule(backend):
    w = torch.randn(8)  # 2 counters
    a = torch.tensor([0.1])
    pni_fast.noisy_weight(w, a, seed=1, offset=2**63 - 3, backend=backend)  # 2^63-3 + 2 < 2^63
    with pytest.raises(ValueError) as e:
        pni_fast.noisy_weight(w, a, seed=1, offset=2**63 - 2, backend=backend)
    assert str(e.value) == message("counter_limit", offset=2**63 - 2, numel=8)  # the op contract's rule


def test_single_nan_element_and_infinite_alpha():
    one = torch.tensor([float("nan")])
    out = pni_fast.noisy_weight(one, torch.tensor([0.5]), seed=1)  # < 2 elements: sigma 0, returned unchanged
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match="alpha must be finite"):
        pni_fast.noisy_weight(torch.ones(5), torch.tensor([float("inf")]), seed=1)
    with pytest.raises(ValueError, match="alpha must be finite"):
        pni_fast.noisy_weights([torch.ones(5)], [torch.tensor([float("nan")])], seed=1)


def test_seed_types():
    w, a = torch.randn(4, 4), torch.tensor([0.2])
    ref = pni_fast.noisy_weight(w, a, seed=7)
    assert torch.equal(pni_fast.noisy_weight(w, a, seed=np.int64(7)), ref)
    assert torch.equal(pni_fast.noisy_weight(w, a, seed=np.uint32(7)), ref)
    with pytest.raises(TypeError, match="seed"):
        pni_fast.noisy_weight(w, a, seed=7.0)
    with pytest.raises(TypeError, match="seed"):
        pni_fast.noisy_weight(w, a, seed=True)
    with pytest.raises(TypeError, match="shape"):
        pni_fast.randn((2.7,), seed=1)
    assert pni_fast.randn((np.int64(3),), seed=1).shape == (3,)


def test_weight_sigmas_equal_weight_sigma_bitwise():
    torch.manual_seed(3)
    ts = [
        torch.randn(n).to(d)
        for n, d in [
            (0, torch.float32),
            (1, torch.float32),
            (5, torch.float32),
            (432, torch.float32),
            (100, torch.bfloat16),
            (33, torch.float16),
            (77, torch.float64),
            (20000, torch.float32),
        ]
    ]
    got = sigma_ops.weight_sigmas(ts)
    for t, s in zip(ts, got):
        assert torch.equal(s, pni_fast.weight_sigma(t)), t.dtype


def test_weight_sigmas_bad_input():
    with pytest.raises(TypeError, match=r"ts\[1\] must be a torch.Tensor"):
        sigma_ops.weight_sigmas([torch.randn(3), [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"ts\[0\] must be float32"):
        sigma_ops.weight_sigmas([torch.ones(3, dtype=torch.int64)])
    assert sigma_ops.weight_sigmas([]) == []
