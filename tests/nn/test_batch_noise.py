"""One weight-noise draw per forward: batch_weight_noise against per-layer calls with offsets, and the
number of pni_fast ops a converted model runs per training step (profiler counts)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pni_fast
import pni_fast.functional as fn
from pni_fast.nn.layers import NoisyConv2d, NoisyLinear

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")


def _mixed_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        NoisyConv2d(2, 3, 3, pni="channelwise"),
        nn.Flatten(),
        NoisyLinear(3 * 16, 4, noise="both"),
        pni_fast.NoiseInjection(4),
        NoisyLinear(4, 2, noise="input"),
        NoisyLinear(2, 2),
        NoisyLinear(2, 2, pni="elementwise"),
    )
    model[5].noise_enabled = False
    return model


def _run(model, x, seed):
    torch.manual_seed(seed)
    out = model(x)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)  # a switched-off layer's alpha: None
    return out, [torch.zeros(()) if g is None else g for g in grads]


@pytest.mark.parametrize("backend", ["torch", None])
def test_batching_never_changes_the_numbers(backend, monkeypatch):
    """Batched and unbatched forwards give the same bits for the same generator state: each layer's noise is
    noisy_weight(weight, alpha, seed=the seed it draws at its call), the batch only computes it ahead."""
    from pni_fast.nn.batching import batch_weight_noise

    if backend:
        monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    model = _mixed_model()
    x = torch.randn(2, 2, 6, 6)
    plain_out, plain_grads = _run(model, x, 5)
    handle = batch_weight_noise(model)
    out, grads = _run(model, x, 5)
    assert torch.equal(out, plain_out)
    for g, want in zip(grads, plain_grads):
        assert torch.equal(g, want)
    # by hand: every noise source draws its own seed at its call, in call order, weight before input noise
    torch.manual_seed(5)
    s = [pni_fast.draw_seed() for _ in range(6)]
    m = model
    h = m[0]._conv_forward(x, fn.noisy_weight(m[0].weight, m[0].alpha_w, seed=s[0]), m[0].bias).flatten(1)
    w2 = fn.noisy_weight(m[2].weight, m[2].alpha_w, seed=s[1])
    h = F.linear(fn.inject_noise(h, m[2].alpha_i, seed=s[2]), w2, m[2].bias)
    h = fn.inject_noise(h, m[3].alpha, seed=s[3])
    h = F.linear(fn.inject_noise(h, m[4].alpha_i, seed=s[4]), m[4].weight, m[4].bias)
    h = F.linear(h, m[5].weight, m[5].bias)
    ref = F.linear(h, fn.noisy_weight(m[6].weight, m[6].alpha_w, seed=s[5]), m[6].bias)
    assert torch.equal(out, ref)
    torch.manual_seed(6)
    assert not torch.equal(model(x), out), "a new generator state draws new noise"
    handle.remove()
    with pytest.warns(UserWarning, match="no NoisyConv2d/NoisyLinear"):
        batch_weight_noise(nn.Linear(2, 2)).remove()


def test_batched_forward_takes_every_predicted_draw(monkeypatch):
    """The prediction holds for a model whose modules draw in module order: no layer makes its own call."""
    from pni_fast.nn import noise_calls
    from pni_fast.nn.batching import batch_weight_noise

    model = _mixed_model()
    batch_weight_noise(model)
    own_calls = []
    real = noise_calls._fn.noisy_weight
    monkeypatch.setattr(noise_calls._fn, "noisy_weight", lambda *a, **k: own_calls.append(1) or real(*a, **k))
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    assert own_calls == []

    # a layer called twice in one forward: its second call draws the seed predicted for the next layer, so
    # from there on the layers make their own calls; the numbers are those of the unbatched model
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = NoisyLinear(3, 3), NoisyLinear(3, 3)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    twice = Twice()
    handle = batch_weight_noise(twice)
    own_calls.clear()
    torch.manual_seed(3)
    out = twice(torch.ones(1, 3))
    assert len(own_calls) == 2, "a's second call and b's call"
    handle.remove()
    torch.manual_seed(3)
    assert torch.equal(twice(torch.ones(1, 3)), out)


def test_converted_model_draws_all_weight_noise_in_one_call_per_forward_and_backward():
    """convert() batches by default: one multi-tensor perturb per forward, one alpha-grad call per backward,
    no per-layer perturb; batch_noise=False keeps one call per layer; strip removes the hooks."""
    from torch.profiler import profile

    from pni_fast.models import resnet20
    from pni_fast.nn.batching import installed_batch

    def counts(model):
        x = torch.rand(1, 3, 32, 32)
        with profile() as prof:
            model(x).sum().backward()
        names = [e.key for e in prof.key_averages()]
        return {k: sum(e.count for e in prof.key_averages() if e.key == k) for k in set(names) if "pni_fast::" in k}

    if "cpu" not in pni_fast.available_backends("cpu"):
        pytest.skip("the C++ CPU backend (list ops) is not available")
    from pni_fast.ops import fast_path as fused

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
