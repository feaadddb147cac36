"""Monte-Carlo prediction: `pni_fast.robust.predict` (mean softmax over k noisy passes) and its accuracy against k."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pni_fast
from pni_fast.robust import SamplesCurve, accuracy_vs_samples, predict
from pni_fast.robust.cli_eval import _parse_ks
from pni_fast.robust.evaluate import AttackSpec

from toolkit_support import Scripted, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mean_softmax_and_draws_match_an_independent_computation():
    g = torch.Generator().manual_seed(3)
    table = torch.randn(6, 20, 5, generator=g)
    model = Scripted(table)
    probs, draws = predict(model, torch.rand(20, 3), samples=6, return_draws=True)
    assert model.calls == 6
    expected = sum(torch.softmax(table[i], 1) for i in range(6)) / 6
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    assert draws.shape == (6, 20) and draws.dtype == torch.int64
    assert torch.equal(draws, table.argmax(2))
    torch.testing.assert_close(probs.sum(1), torch.ones(20))


def test_deterministic_model_gives_its_softmax_for_every_k():
    model = tiny_cnn(seed=0).eval()
    x = torch.rand(8, 1, 8, 8)
    ref = torch.softmax(model(x), 1)
    for k in (1, 3):
        torch.testing.assert_close(predict(model, x, samples=k), ref)


def test_pni_model_draws_differ_and_state_is_restored():
    model = pni_fast.convert(tiny_cnn(seed=0), pni="layerwise", noise="weight", alpha_init=1.0)
    net = nn.Sequential(nn.BatchNorm2d(1), model).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(32, 1, 8, 8)
    probs, draws = predict(net, x, samples=16, return_draws=True)
    assert (draws != draws[0]).any(), "16 noisy passes gave identical predictions"
    assert net.training and net[0].training, "the caller's train mode must come back"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "BatchNorm statistics changed"
    assert not probs.requires_grad
    # the mean over more passes moves towards the mean over many
    ref = predict(net, x, samples=200)
    err = [(predict(net, x, samples=k) - ref).abs().mean().item() for k in (1, 50)]
    assert err[1] < err[0] / 2


def test_accuracy_vs_samples_matches_an_independent_count():
    n, kmax = 30, 8
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 4, (n,), generator=g)
    table = torch.randn(2 * kmax, n, 4, generator=g) + 0.8 * nn.functional.one_hot(y, 4)
    model = Scripted(table)
    curve = accuracy_vs_samples(model, (torch.rand(n, 2), y), ks=[8, 1, 2], repeats=2, batch_size=n)
    assert isinstance(curve, SamplesCurve) and curve.ks == [1, 2, 8] and curve.n_examples == n
    for rep in range(2):
        draws = torch.softmax(table[rep * kmax : (rep + 1) * kmax], 2)
        for k in (1, 2, 8):
            acc = float((draws[:k].mean(0).argmax(1) == y).float().mean())
            assert curve.accuracies[k][rep] == pytest.approx(acc)
    assert curve.mean[8] == pytest.approx(sum(curve.accuracies[8]) / 2)
    text = curve.format()
    assert "Monte-Carlo prediction" in text and "clean" in text


def test_accuracy_vs_samples_under_attack_uses_the_attack():
    model = pni_fast.convert(tiny_cnn(seed=0), pni="layerwise", noise="weight", alpha_init=0.1).eval()
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    clean = accuracy_vs_samples(model, (x, y), ks=[1, 4], repeats=1)
    attacked = accuracy_vs_samples(
        model, (x, y), ks=[1, 4], repeats=1, attack=AttackSpec("pgd", eps=0.3, alpha=0.1, steps=3)
    )
    assert attacked.attack == "PGD-3" and attacked.mean[4] < clean.mean[4]


def test_argument_errors():
    model = tiny_cnn(seed=0)
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="samples"):
        predict(model, x, samples=0)
    with pytest.raises(TypeError, match="floating-point"):
        predict(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="return_draws"):
        predict(model, x, return_draws=1)
    with pytest.raises(ValueError, match="logits"):
        predict(nn.Identity(), x)
    with pytest.raises(ValueError, match="k must be"):
        accuracy_vs_samples(model, (x, torch.zeros(2, dtype=torch.long)), ks=[0])
    assert _parse_ks("1, 2,8") == [1, 2, 8]
    for bad in ("0", "a", ","):
        with pytest.raises(ValueError, match="--mc-curve"):
            _parse_ks(bad)
