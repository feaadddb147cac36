"""Attacks and evaluation: threat-model constraints, strength, EOT sampling, model state, errors.
The toolkit's packaging (lazy names, old module paths, shared helpers): tests/robust/test_robust_toolkit.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pni_fast.robust import attacks
from pni_fast.robust.attacks import carlini_wagner_l2, eot_pgd, fgsm, pgd
from pni_fast.robust.data import load_digits
from pni_fast.robust.evaluate import AttackSpec, evaluate, format_results


class WeightNoiseMLP(nn.Module):
    """A tiny PNI-W-like model written here (independent of pni_fast.nn.layers): fresh weight noise per forward."""

    def __init__(self, base: nn.Sequential, scale: float = 0.3) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.calls = 0
        self.draws: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = x.flatten(1)
        lin1, lin2 = self.base[1], self.base[3]
        z = torch.randn_like(lin1.weight)
        self.draws.append(z[0, 0].item())
        w1 = lin1.weight + self.scale * lin1.weight.detach().std() * z
        h = F.relu(F.linear(h, w1, lin1.bias))
        return lin2(h)


def _train_mlp(seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    train, test = load_digits()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(train.x), train.y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, test.x[:128], test.y[:128]


@pytest.fixture(scope="module")
def trained():
    return _train_mlp()


def _loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_trained_fixture_is_accurate(trained):
    model, x, y = trained
    assert _acc(model, x, y) > 0.9


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_pgd_respects_ball_and_box_and_raises_loss(trained, norm, eps):
    model, x, y = trained
    x_before = x.clone()
    xa = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm)
    assert torch.equal(x, x_before), "caller's tensor was modified"
    assert xa.min() >= 0 and xa.max() <= 1
    d = (xa - x).flatten(1)
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert d.norm(dim=1).max() <= eps + 1e-5
    assert _loss(model, xa, y) > _loss(model, x, y) + 0.5
    assert not xa.requires_grad


def test_fgsm_ball_box_and_loss(trained):
    model, x, y = trained
    xa = fgsm(model, x, y, eps=0.1)
    assert xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max() <= 0.1 + 1e-6
    assert _loss(model, xa, y) > _loss(model, x, y)


def test_pgd_at_least_as_strong_as_fgsm(trained):
    model, x, y = trained
    eps = 0.1
    acc_fgsm = _acc(model, fgsm(model, x, y, eps=eps), y)
    acc_pgd = _acc(model, pgd(model, x, y, eps=eps, alpha=eps / 4, steps=20), y)
    assert acc_pgd <= acc_fgsm
    assert acc_pgd < _acc(model, x, y) - 0.3


def test_restarts_keep_every_success(trained):
    model, x, y = trained
    kw = dict(eps=0.05, alpha=0.0125, steps=3)
    one = pgd(model, x, y, restarts=1, generator=torch.Generator().manual_seed(3), **kw)
    three = pgd(model, x, y, restarts=3, generator=torch.Generator().manual_seed(3), **kw)
    with torch.no_grad():
        fooled1 = model(one).argmax(1) != y
        fooled3 = model(three).argmax(1) != y
    assert bool((fooled3 | ~fooled1).all()), "a restart lost an adversarial example the first restart had"
    assert (three - x).abs().max() <= 0.05 + 1e-6


def test_generator_makes_attack_reproducible(trained):
    model, x, y = trained
    a = pgd(model, x, y, eps=0.05, alpha=0.01, steps=2, generator=torch.Generator().manual_seed(1))
    b = pgd(model, x, y, eps=0.05, alpha=0.01, steps=2, generator=torch.Generator().manual_seed(1))
    c = pgd(model, x, y, eps=0.05, alpha=0.01, steps=2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_targets_predictions_without_labels(trained):
    model, x, y = trained
    with torch.no_grad():
        pred = model(x).argmax(1)
    xa = pgd(model, x, targets="predictions", eps=0.1, alpha=0.025, steps=5)
    assert _loss(model, xa, pred) > _loss(model, x, pred)
    with pytest.raises(ValueError, match="targets='labels'"):
        pgd(model, x, None, eps=0.1)


def test_model_state_restored(trained):
    model, x, y = trained
    model.train()
    model[1].weight.requires_grad_(False)
    try:
        pgd(model, x, y, eps=0.05, steps=2, mode="eval")
        assert all(m.training for m in model.modules())
        assert model[1].weight.requires_grad is False
        assert model[3].weight.requires_grad is True
        assert model[3].weight.grad is None, "attack leaked gradients into parameters"
        carlini_wagner_l2(model, x[:4], y[:4], steps=2, search_steps=1)
        assert all(m.training for m in model.modules())
    finally:
        model[1].weight.requires_grad_(True)
        model.eval()


def test_mode_switch_is_used_during_attack():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            seen.append(self.training)
            return self.lin(x)

    m = Probe().train()
    x = torch.rand(5, 4)
    y = torch.randint(0, 3, (5,))
    pgd(m, x, y, eps=0.1, steps=2, mode="eval")
    assert seen and not any(seen)
    assert m.training


def test_eot_uses_k_fresh_forward_passes_per_step(trained):
    base, x, y = trained
    model = WeightNoiseMLP(base)
    steps, k = 3, 5
    eot_pgd(model, x, y, eps=0.1, alpha=0.02, steps=steps, eot_samples=k)
    assert model.calls == steps * k
    assert len(set(model.draws)) == steps * k, "EOT passes reused a noise draw"
    model.calls = 0
    eot_pgd(model, x, targets="predictions", eps=0.1, alpha=0.02, steps=2, eot_samples=k)
    assert model.calls == 1 + 2 * k  # one pass for the predictions


def test_eot_gradient_is_the_average_of_k_passes(trained):
    """With a fixed seed, the EOT gradient equals the mean of K single-pass gradients drawn in sequence."""
    base, x, y = trained
    model = WeightNoiseMLP(base)
    x = x[:8]
    y = y[:8]
    torch.manual_seed(7)
    g_eot = attacks._input_grad(model, x, y, samples=4)
    torch.manual_seed(7)
    g_single = torch.stack([attacks._input_grad(model, x, y, samples=1) for _ in range(4)]).mean(0)
    torch.testing.assert_close(g_eot, g_single)


def test_cw_finds_small_l2_adversarials(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    xa = carlini_wagner_l2(model, x, y, c=1.0, steps=60, lr=0.05, search_steps=3)
    assert xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        fooled = model(xa).argmax(1) != y
    assert fooled.float().mean() > 0.8
    l2 = (xa - x).flatten(1).norm(dim=1)
    assert torch.all(l2[~fooled] == 0), "examples without a success must come back unchanged"
    # CW's minimal perturbations are smaller than a 20-step L2 PGD needs at the same success
    assert l2[fooled].median() < 3.0


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="0.1"), TypeError, "eps"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(restarts=0), ValueError, "restarts"),
        (dict(eot_samples=0), ValueError, "eot_samples"),
        (dict(norm="l1"), ValueError, "norm"),
        (dict(targets="label"), ValueError, "targets"),
        (dict(mode="test"), ValueError, "mode"),
        (dict(random_start=1), TypeError, "random_start"),
    ],
)
def test_pgd_argument_errors(trained, kwargs, exc, match):
    model, x, y = trained
    with pytest.raises(exc, match=match):
        pgd(model, x, y, **kwargs)


def test_input_errors(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fgsm(model, x * 2 + 0.5, y)
    with pytest.raises(TypeError, match="floating"):
        fgsm(model, (x * 255).to(torch.uint8), y)
    with pytest.raises(ValueError, match="shape"):
        fgsm(model, x, y[:3])
    with pytest.raises(TypeError, match="integer"):
        fgsm(model, x, y.float())
    with pytest.raises(TypeError, match="nn.Module"):
        fgsm(lambda t: t, x, y)
    with pytest.raises(ValueError, match="c must"):
        carlini_wagner_l2(model, x, y, c=0)


def test_zero_eps_and_empty_batch(trained):
    model, x, y = trained
    assert torch.equal(pgd(model, x, y, eps=0.0), x)
    e = pgd(model, x[:0], y[:0])
    assert e.shape == x[:0].shape


def test_evaluate_deterministic_model_has_zero_std(trained):
    model, x, y = trained
    specs = [AttackSpec("clean"), AttackSpec("fgsm", eps=0.05), AttackSpec("pgd", eps=0.05, alpha=0.0125, steps=8)]
    res = evaluate(model, (x, y), specs, repeats=3, batch_size=50)
    assert [r.attack for r in res] == ["clean", "FGSM", "PGD-8"]
    for r in res:
        assert r.std == 0.0
        assert len(r.accuracies) == 3
        assert r.n_examples == x.shape[0]
    assert res[0].mean > res[1].mean >= res[2].mean
    assert res[2].settings["eps"] == 0.05 and res[2].settings["steps"] == 8
    assert "steps=8" in res[2].description and "random start=yes" in res[2].description
    table = format_results({"mlp": res})
    assert "PGD-8" in table and "+/-" in table and "R=3" in table


def test_evaluate_noisy_model_varies_and_restores_mode(trained):
    base, x, y = trained
    model = WeightNoiseMLP(base, scale=1.0).train()
    res = evaluate(
        model, (x, y), [AttackSpec("clean"), AttackSpec("eot-pgd", eps=0.05, steps=2, eot_samples=2)], repeats=4
    )
    assert res[0].std > 0
    assert res[1].attack == "EOT-PGD-2x2" and "EOT samples=2" in res[1].description
    assert model.training


def test_attackspec_errors():
    with pytest.raises(ValueError, match="kind"):
        AttackSpec("pgd2")
    with pytest.raises(ValueError, match="eot_samples"):
        AttackSpec("eot-pgd", eot_samples=1)
    with pytest.raises(ValueError, match="repeats"):
        evaluate(nn.Linear(2, 2), (torch.rand(3, 2), torch.zeros(3, dtype=torch.long)), repeats=0)


@pytest.mark.cuda
def test_pgd_on_cuda(trained):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, x, y = trained
    m = model.cuda()
    try:
        xa = pgd(m, x.cuda(), y.cuda(), eps=0.05, steps=2, generator=torch.Generator().manual_seed(0))
        assert xa.is_cuda and (xa.cpu() - x).abs().max() <= 0.05 + 1e-6
    finally:
        model.cpu()


def test_torchattacks_eot_pgd_accepts_a_pni_model():
    """Interoperability: an external attack library treats a converted PNI model as a plain nn.Module."""
    torchattacks = pytest.importorskip(
        "torchattacks", reason="torchattacks not installed (pip install --no-deps torchattacks)"
    )
    try:
        from pni_fast import convert
    except ImportError as e:  # pragma: no cover - until pni_fast.convert lands
        pytest.skip(f"pni_fast.convert unavailable: {e}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    model = convert(model, pni="layerwise", noise="weight")
    model.eval()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    atk = torchattacks.EOTPGD(model, eps=0.1, alpha=0.02, steps=2, eot_iter=2)
    xa = atk(x, y)
    assert xa.shape == x.shape and (xa - x).abs().max() <= 0.1 + 1e-6


def test_cw_through_evaluate_records_its_settings(trained):
    model, x, y = trained
    spec = AttackSpec("cw", cw_c=0.5, cw_kappa=1.0, cw_steps=40, cw_search_steps=2, cw_lr=0.05)
    (res,) = evaluate(model, (x[:16], y[:16]), [spec], repeats=1)
    assert res.attack == "CW-L2" and res.settings["cw_kappa"] == 1.0
    assert "kappa=1" in res.description and "c=0.5" in res.description and "unbounded" in res.description
    assert res.mean < _acc(model, x[:16], y[:16]) - 0.5
