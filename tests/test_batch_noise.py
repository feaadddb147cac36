"""One weight-noise draw per forward: batch_weight_noise against per-layer calls with offsets, and the
number of pni_fast ops a converted model runs per training step (profiler counts)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pni_fast
import pni_fast.functional as fn
from pni_fast.modules import NoisyConv2d, NoisyLinear

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")


@pytest.mark.parametrize("backend", ["torch", None])
def test_batch_weight_noise_equals_per_layer_calls_with_offsets(backend, monkeypatch):
    """One multi-tensor draw per forward: layer k gets noisy_weight(seed, offset = counters of layers < k)."""
    from pni_fast.batching import batch_weight_noise

    if backend:
        monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    torch.manual_seed(0)
    model = nn.Sequential(
        NoisyConv2d(2, 3, 3, pni="channelwise"),
        nn.Flatten(),
        NoisyLinear(3 * 16, 4, noise="both"),
        NoisyLinear(4, 2, noise="input"),
        NoisyLinear(2, 2),
    )
    model[4].noise_enabled = False
    x = torch.randn(2, 2, 6, 6)
    handle = batch_weight_noise(model)
    torch.manual_seed(5)
    out = model(x)
    assert all(m.__dict__.get("_pni_pending_weight") is None for m in model), "pending draws are cleared"
    grads = torch.autograd.grad(out.sum(), [model[0].alpha_w, model[2].alpha_w, model[2].alpha_i])

    torch.manual_seed(5)
    seed = fn.draw_seed()
    w0 = fn.noisy_weight(model[0].weight, model[0].alpha_w, seed=seed, offset=0)
    w2 = fn.noisy_weight(model[2].weight, model[2].alpha_w, seed=seed, offset=-(-model[0].weight.numel() // 4))
    h = model[0]._conv_forward(x, w0, model[0].bias).flatten(1)
    h = F.linear(fn.inject_noise(h, model[2].alpha_i), w2, model[2].bias)
    h = F.linear(fn.inject_noise(h, model[3].alpha_i), model[3].weight, model[3].bias)
    ref = F.linear(h, model[4].weight, model[4].bias)
    torch.testing.assert_close(out, ref)
    want = torch.autograd.grad(ref.sum(), [model[0].alpha_w, model[2].alpha_w, model[2].alpha_i])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    handle.remove()
    torch.manual_seed(5)
    assert not torch.allclose(model(x), out), "after remove() each layer draws its own seed again"
    with pytest.warns(UserWarning, match="no NoisyConv2d/NoisyLinear"):
        batch_weight_noise(nn.Linear(2, 2)).remove()


def test_converted_model_draws_all_weight_noise_in_one_call_per_forward_and_backward():
    """convert() batches by default: one multi-tensor perturb per forward, one alpha-grad call per backward,
    no per-layer perturb; batch_noise=False keeps one call per layer; strip removes the hooks."""
    from torch.profiler import profile

    from pni_fast.batching import installed_batch
    from pni_fast.models import resnet20

    def counts(model):
        x = torch.rand(1, 3, 32, 32)
        with profile() as prof:
            model(x).sum().backward()
        names = [e.key for e in prof.key_averages()]
        return {k: sum(e.count for e in prof.key_averages() if e.key == k) for k in set(names) if "pni_fast::" in k}

    if "cpu" not in pni_fast.available_backends("cpu"):
        pytest.skip("the C++ CPU backend (list ops) is not available")
    from pni_fast import fused

    # the general path (torch.compile / torch.func use it): one op of each kind per step
    fused.ENABLED = False
    try:
        batched = counts(resnet20(pni="channelwise"))
    finally:
        fused.ENABLED = True
    assert batched.get("pni_fast::perturb_multi") == 1 and batched.get("pni_fast::perturb_alpha_grad_multi") == 1
    assert "pni_fast::perturb" not in batched and "pni_fast::perturb_alpha_grad" not in batched
    assert batched.get("pni_fast::sigma_multi") == 1 and "pni_fast::sigma" not in batched  # one sigma pass
    # the eager fast path: one fused op per forward (one sigma pass inside), one C++ autograd node per backward
    # (it reads the stored noise: no alpha-gradient op), nothing per layer
    fast = counts(resnet20(pni="channelwise"))
    assert fast.get("pni_fast::noisy_multi") == 1 and fast.get("pni_fast::sigma_multi") == 1, fast
    assert not {"pni_fast::perturb", "pni_fast::perturb_alpha_grad", "pni_fast::noisy", "pni_fast::sigma"} & set(fast)
    nodes = [k for k in fast if "NoisyMultiFunction" in k and "evaluate_function" in k]
    assert len(nodes) == 1 and fast[nodes[0]] == 1, fast
    model = resnet20()
    pni_fast.convert(model, pni="channelwise", batch_noise=False)
    assert installed_batch(model) is None
    per_layer = counts(model)
    assert per_layer.get("pni_fast::perturb") == 20 and "pni_fast::perturb_multi" not in per_layer
    m2 = resnet20(pni="layerwise")
    pni_fast.strip(m2)
    assert installed_batch(m2) is None
