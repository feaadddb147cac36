"""NoisyConv2d / NoisyLinear: math against the reference, gradients, state_dict, noise control and
bad input. NoiseInjection (activation noise): tests/nn/test_noise_injection.py; one weight-noise draw per
forward (batch_weight_noise): tests/nn/test_batch_noise.py."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pni_fast.functional as fn
from pni_fast.nn.control import no_noise, noise_enabled, set_noise
from pni_fast.nn.layers import NoiseInjection, NoisyConv2d, NoisyLinear
from pni_fast.reference import reference_inject_noise, reference_noisy_weight

from modules_support import draw_seeds, randomize_alphas

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")

MODES = ["layerwise", "channelwise", "elementwise"]
NOISES = ["weight", "input", "both"]


def _expected(m, x, seed):
    """Forward of ``m`` written with the paper-faithful reference and the contract's z."""
    seeds = draw_seeds(seed, int(m.alpha_w is not None) + int(m.alpha_i is not None))
    w = m.weight
    if m.alpha_w is not None:
        z = fn.randn(w.shape, seed=seeds.pop(0))
        w = reference_noisy_weight(w, m.alpha_w, z=z)
    if m.alpha_i is not None:
        xv = x.reshape(-1, x.shape[-1]) if isinstance(m, nn.Linear) else x
        inner = 1 if (m.pni == "layerwise" or isinstance(m, nn.Linear)) else math.prod(x.shape[2:])
        z = fn.randn(xv.shape, seed=seeds.pop(0))
        x = reference_inject_noise(xv, m.alpha_i, inner=inner, z=z).reshape(x.shape)
    if isinstance(m, nn.Conv2d):
        return m._conv_forward(x, w, m.bias)
    return F.linear(x, w, m.bias)


def _make(kind, pni, noise, dtype=torch.float64):
    torch.manual_seed(1)
    if kind == "conv":
        m = NoisyConv2d(4, 6, 3, padding=1, pni=pni, noise=noise, dtype=dtype)
        x = torch.randn(2, 4, 5, 5, dtype=dtype)
    else:
        m = NoisyLinear(7, 5, pni=pni, noise=noise, dtype=dtype)
        x = torch.randn(3, 7, dtype=dtype)
    randomize_alphas(m)
    return m, x


def _combos():
    for kind in ("conv", "linear"):
        for pni in MODES:
            for noise in NOISES:
                if kind == "conv" and pni == "elementwise" and noise != "weight":
                    continue  # refused at construction (tested below)
                yield kind, pni, noise


@pytest.mark.parametrize("kind,pni,noise", list(_combos()))
def test_forward_and_grads_match_reference(kind, pni, noise):
    m, x = _make(kind, pni, noise)
    x1 = x.clone().requires_grad_(True)
    torch.manual_seed(123)
    out = m(x1)
    grad_out = torch.randn_like(out)
    params = [p for p in m.parameters()]
    got = torch.autograd.grad(out, params + [x1], grad_out)

    x2 = x.clone().requires_grad_(True)
    ref = _expected(m, x2, 123)
    want = torch.autograd.grad(ref, params + [x2], grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    names = [n for n, _ in m.named_parameters()] + ["input"]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda s: f"grad of {name}: {s}")


def test_alpha_shapes_and_names():
    c = NoisyConv2d(3, 8, 3, noise="both", pni="channelwise")
    assert c.alpha_w.shape == (8, 1, 1, 1) and c.alpha_i.shape == (3,)
    assert NoisyConv2d(3, 8, 3).alpha_w.shape == (1,)
    assert NoisyConv2d(3, 8, 3, pni="elementwise").alpha_w.shape == (8, 3, 3, 3)
    lin = NoisyLinear(5, 4, pni="channelwise", noise="both")
    assert lin.alpha_w.shape == (4, 1) and lin.alpha_i.shape == (5,)
    assert NoisyLinear(5, 4, pni="elementwise").alpha_w.shape == (4, 5)
    i_only = NoisyLinear(5, 4, noise="input")
    assert i_only.alpha_w is None and set(i_only.state_dict()) == {"weight", "bias", "alpha_i"}
    assert set(NoisyConv2d(3, 8, 3).state_dict()) == {"weight", "bias", "alpha_w"}
    assert torch.all(NoisyLinear(5, 4, alpha_init=0.1).alpha_w == 0.1)
    assert isinstance(c, nn.Conv2d) and isinstance(lin, nn.Linear)
    assert "pni='channelwise'" in repr(c) and "noise='both'" in repr(c)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(groups=2, dilation=2, padding=2),
        dict(padding_mode="reflect", padding=1, bias=False),
        dict(padding_mode="circular", padding=(1, 2), stride=2),
        dict(padding="same"),
    ],
)
def test_conv_arguments_match_nn_conv2d(kwargs):
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, dtype=torch.float64, **kwargs)
    noisy = NoisyConv2d(4, 6, 3, dtype=torch.float64, pni="channelwise", **kwargs)
    noisy.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    noisy.noise_enabled = False
    torch.testing.assert_close(noisy(x), plain(x))
    noisy.noise_enabled = True
    torch.manual_seed(5)
    out = noisy(x)
    (seed,) = draw_seeds(5, 1)
    w = reference_noisy_weight(plain.weight, noisy.alpha_w, z=fn.randn(plain.weight.shape, seed=seed))
    torch.testing.assert_close(out, plain._conv_forward(x, w, plain.bias))


def test_dtype_device_and_unbatched_inputs():
    c = NoisyConv2d(2, 3, 3, noise="both", pni="channelwise", dtype=torch.float64)
    assert c.alpha_w.dtype == torch.float64 and c.alpha_i.dtype == torch.float64
    assert NoisyLinear(2, 3, device="meta").alpha_w.is_meta
    x = torch.randn(2, 6, 6, dtype=torch.float64)  # unbatched [C, H, W]
    torch.manual_seed(3)
    out = c(x)
    torch.manual_seed(3)
    out_b = c(x.unsqueeze(0))
    torch.testing.assert_close(out, out_b.squeeze(0))
    lin = NoisyLinear(4, 2, noise="input", pni="channelwise", dtype=torch.float64)
    x3 = torch.randn(2, 3, 4, dtype=torch.float64)  # features on the last dim
    torch.manual_seed(4)
    out3 = lin(x3)
    torch.manual_seed(4)
    torch.testing.assert_close(out3, lin(x3.reshape(6, 4)).reshape(2, 3, 2))


def test_autocast_and_low_precision():
    m = NoisyConv2d(3, 4, 3, pni="channelwise", noise="both")
    x = torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16())  # input noise on a bf16 activation with an fp32 alpha_i
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert m.alpha_i.grad.dtype == torch.float32 and torch.isfinite(m.alpha_w.grad).all()
    half = NoisyLinear(4, 3, noise="both").to(torch.bfloat16)
    assert half(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_noise_is_fresh_and_on_in_eval_and_no_grad():
    m, x = _make("linear", "layerwise", "weight", dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
    assert not torch.equal(a, b), "noise must be redrawn every forward, also in eval/no_grad"
    plain = F.linear(x, m.weight, m.bias)
    assert not torch.allclose(a, plain)
    m.noise_enabled = False
    torch.testing.assert_close(m(x), plain)
    torch.manual_seed(9)
    a = m.train()(x)
    m.noise_enabled = True
    torch.manual_seed(9)
    b = m(x)
    assert not torch.equal(a, b)
    torch.manual_seed(9)
    torch.testing.assert_close(m(x), b)  # reproducible from torch.manual_seed


def test_noise_scale_statistics():
    """The perturbation has std alpha * std(w): a check that does not reuse the module's code path."""
    torch.manual_seed(0)
    m = NoisyLinear(256, 256, bias=False, alpha_init=0.5)
    eye = torch.eye(256)
    delta = (m(eye).T - m.weight).detach()  # noisy weight minus weight
    ratio = delta.std().item() / (0.5 * m.weight.std().item())
    assert abs(ratio - 1) < 0.02, ratio
    assert abs(delta.mean().item()) < 0.02 * delta.std().item() * 5


def test_noise_control_helpers():
    model = nn.Sequential(NoisyConv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), NoisyLinear(2 * 4 * 4, 3), NoiseInjection())
    model[3].noise_enabled = False  # a module switched off by hand stays off after the context
    assert noise_enabled(model) is True
    with no_noise(model) as m:
        assert m is model
        assert not any(x.noise_enabled for x in (model[0], model[3], model[4]))
        assert noise_enabled(model) is False
    assert model[0].noise_enabled and not model[3].noise_enabled and model[4].noise_enabled
    with pytest.raises(RuntimeError):
        with no_noise(model):
            raise RuntimeError("boom")
    assert model[0].noise_enabled and not model[3].noise_enabled
    assert set_noise(model, False) is model and not noise_enabled(model)
    assert noise_enabled(model, True) is model and noise_enabled(model)
    x = torch.rand(2, 1, 6, 6)
    with no_noise(model):
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_noise(model, "off")
    with pytest.warns(UserWarning, match="no PNI module"):
        set_noise(nn.Linear(2, 2), False)


def test_plain_checkpoint_loads_with_strict_false():
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3)
    noisy = NoisyConv2d(3, 4, 3, pni="channelwise", noise="both", alpha_init=0.3)
    result = noisy.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == {"alpha_w", "alpha_i"} and not result.unexpected_keys
    assert torch.equal(noisy.weight, plain.weight) and torch.equal(noisy.bias, plain.bias)
    assert torch.all(noisy.alpha_w == 0.3) and torch.all(noisy.alpha_i == 0.3)
    with pytest.raises(RuntimeError, match="alpha_w"):
        noisy.load_state_dict(plain.state_dict())  # strict: the alphas are missing


def test_state_dict_round_trip_and_wrong_alpha_shape():
    a = NoisyLinear(6, 3, pni="elementwise", noise="both")
    randomize_alphas(a)
    b = NoisyLinear(6, 3, pni="elementwise", noise="both")
    b.load_state_dict(a.state_dict())
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    layerwise = NoisyLinear(6, 3)
    with pytest.raises(RuntimeError, match=r"pni='elementwise'.*built with pni='layerwise'"):
        layerwise.load_state_dict(a.state_dict(), strict=False)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))


def test_deepcopy_and_pickle():
    m, x = _make("conv", "channelwise", "both", dtype=torch.float32)
    m.noise_enabled = False
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone.pni == "channelwise" and clone.noise == "both" and clone.noise_enabled is False
        torch.testing.assert_close(clone(x), m(x))
        clone.noise_enabled = True
        torch.manual_seed(2)
        a = clone(x)
        m.noise_enabled = True
        torch.manual_seed(2)
        torch.testing.assert_close(a, m(x))
        m.noise_enabled = False


def test_reset_parameters_resets_alphas():
    m = NoisyLinear(3, 3, noise="both", alpha_init=0.2)
    randomize_alphas(m)
    m.reset_parameters()
    assert torch.all(m.alpha_w == 0.2) and torch.all(m.alpha_i == 0.2)


def test_gradcheck_alpha_float64():
    """Finite differences agree with the fused op's alpha gradient (same seed each evaluation)."""
    torch.manual_seed(0)
    m = NoisyLinear(4, 3, pni="channelwise", noise="both", dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)

    def f(alpha_w, alpha_i, xin):
        torch.manual_seed(11)
        return torch.func.functional_call(m, {"alpha_w": alpha_w, "alpha_i": alpha_i}, (xin,))

    # only the alphas: sigma = std(x) is detached by design, so d/dx is the identity, not the full derivative
    inputs = (m.alpha_w.detach().clone().requires_grad_(True), m.alpha_i.detach().clone().requires_grad_(True), x)
    assert torch.autograd.gradcheck(f, inputs)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls,args", [(NoisyConv2d, (2, 2, 3)), (NoisyLinear, (2, 2))])
def test_bad_arguments(cls, args):
    with pytest.raises(ValueError, match="pni must be 'layerwise', 'channelwise' or 'elementwise', got 'layer'"):
        cls(*args, pni="layer")
    with pytest.raises(ValueError, match="noise must be 'weight', 'input' or 'both', got 'weights'"):
        cls(*args, noise="weights")
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha_init must be a finite number >= 0"):
            cls(*args, alpha_init=bad)
    with pytest.raises(TypeError, match="alpha_init must be a float"):
        cls(*args, alpha_init="0.25")
    cls(*args, alpha_init=0)  # zero is allowed (noise off until alpha is learned)


def test_wrong_alpha_shape_assigned_by_hand():
    m = NoisyLinear(4, 3)
    m.alpha_w = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="alpha must have 1 element"):
        m(torch.randn(1, 4))
