"""NoiseInjection: activation noise against the paper-faithful reference, its gradients and its bad
input (and the input noise NoisyConv2d refuses)."""

import warnings

import pytest
import torch

import pni_fast.functional as fn
from pni_fast.nn.layers import NoiseInjection, NoisyConv2d
from pni_fast.reference import reference_inject_noise

from modules_support import draw_seeds, randomize_alphas

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")


@pytest.mark.parametrize("pni", ["layerwise", "channelwise"])
def test_noise_injection_matches_reference(pni):
    torch.manual_seed(0)
    m = NoiseInjection(4, pni=pni).double()
    randomize_alphas(m)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = m(x)
    (seed,) = draw_seeds(7, 1)
    x2 = x.detach().clone().requires_grad_(True)
    inner = 1 if pni == "layerwise" else 9
    ref = reference_inject_noise(x2, m.alpha, inner=inner, z=fn.randn(x.shape, seed=seed))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, m.alpha], g)
    want = torch.autograd.grad(ref, [x2, m.alpha], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert "pni=" in repr(m)
    m.noise_enabled = False
    assert m(x) is x


def test_bad_noise_injection_and_conv_elementwise_input():
    with pytest.raises(ValueError, match="needs num_channels"):
        NoiseInjection(pni="channelwise")
    with pytest.raises(ValueError, match="pni must be 'layerwise' or 'channelwise'"):
        NoiseInjection(4, pni="elementwise")
    with pytest.raises(ValueError, match="num_channels must be a positive int"):
        NoiseInjection(0)
    with pytest.raises(ValueError, match=r"expects input \[N, 4, \.\.\.\]"):
        NoiseInjection(4, pni="channelwise")(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="elementwise' input noise on NoisyConv2d"):
        NoisyConv2d(2, 2, 3, pni="elementwise", noise="both")
