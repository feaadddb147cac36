"""EOT-Square: Square whose acceptance test, stopping rule and restart verdicts use the margin averaged over m passes.

Checked against torchattacks' Square on a deterministic model (m=1 is Square: same examples fooled by the same
points), against an independent computation of the averaged margin, and on a PNI model (lower accuracy than
plain Square at equal queries).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pni_fast.robust.evaluate import AttackSpec, evaluate
from pni_fast.robust.interop import eot_square_attack, square_attack

from toolkit_support import pni_copy, prototype_digits, tiny_cnn

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("torchattacks") is None,
        reason="torchattacks not installed (pip install --no-deps torchattacks)",
    ),
]
EPS = 0.5


@pytest.fixture(scope="module")
def digits():
    return prototype_digits(64)


def _expected_accuracy(model, x, y, passes: int = 40) -> float:
    """Accuracy averaged over many noisy passes (the expectation one noisy evaluation estimates)."""
    with torch.no_grad():
        return sum(float((model(x).argmax(1) == y).float().mean()) for _ in range(passes)) / passes


@pytest.mark.parametrize("restarts", [1, 2])
def test_one_sample_on_a_deterministic_model_is_square(digits, restarts):
    model, x, y = digits
    ref = square_attack(model, x, y, eps=EPS, n_queries=30, restarts=restarts, seed=3)
    ours = eot_square_attack(model, x, y, eps=EPS, n_queries=30, eot_samples=1, restarts=restarts, seed=3)
    with torch.no_grad():
        pred_ref, pred_ours = model(ref).argmax(1), model(ours).argmax(1)
    assert torch.equal(pred_ref, pred_ours)
    fooled = pred_ref != y
    assert 0 < int(fooled.sum()) < len(y)
    assert torch.equal(ours[fooled], ref[fooled]), "the fooling points differ from Square's"
    # where Square failed it returns x; EOT-Square returns its best point (lower margin), still classified right
    assert (ours - x).abs().max() <= EPS + 1e-6 and ours.min() >= 0 and ours.max() <= 1


def test_mean_margin_is_the_average_over_m_passes(digits):
    """The margin behind every decision is the mean of m per-pass margins (checked on a model with known outputs)."""
    import torchattacks

    from pni_fast.robust.interop import _eot_square_class

    model, x, y = digits

    class Scripted(nn.Module):
        """Pass i adds shifts[i] to the logits: a randomized model whose draws are known."""

        def __init__(self):
            super().__init__()
            self.base = model
            self.calls = 0
            self.shifts = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))

        def forward(self, inp):
            out = self.base(inp) + self.shifts[self.calls % 5]
            self.calls += 1
            return out

    scripted = Scripted()
    atk = _eot_square_class(torchattacks)(scripted, eot_samples=5, norm="Linf", eps=EPS, n_queries=1)
    margin, loss = atk.margin_and_loss(x, y)
    assert scripted.calls == 5
    with torch.no_grad():
        base = model(x)
    expected = torch.zeros(len(y))
    for i in range(5):
        logits = base + scripted.shifts[i]
        other = logits.masked_fill(F.one_hot(y, 10).bool(), float("-inf")).amax(1)
        expected += (logits.gather(1, y[:, None]).squeeze(1) - other) / 5
    torch.testing.assert_close(margin, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(margin, loss)


def test_each_query_costs_m_passes(digits, monkeypatch):
    model, x, y = digits
    pni = pni_copy(model)
    calls = []
    pni.register_forward_hook(lambda *_: calls.append(1))
    x1, y1 = x[:8], y[:8]
    eot_square_attack(pni, x1, y1, eps=0.01, n_queries=5, eot_samples=3, seed=0)  # eps tiny: nothing is fooled
    n_m3 = len(calls)
    calls.clear()
    eot_square_attack(pni, x1, y1, eps=0.01, n_queries=5, eot_samples=1, seed=0)
    n_m1 = len(calls)
    # m=1: 1 (verdict at x) + 1 (start) + 5 (queries) + 1 (restart verdict); m=3 triples every one of them
    assert n_m1 == 8 and n_m3 == 3 * n_m1


def test_lower_accuracy_than_square_on_a_pni_model(digits):
    """Plain Square follows lucky noisy passes; EOT-Square at the same queries brings the PNI model lower."""
    model, x, y = digits
    pni = pni_copy(model)
    clean = _expected_accuracy(pni, x, y)
    square = _expected_accuracy(pni, square_attack(pni, x, y, eps=EPS, n_queries=60, seed=3), y)
    eot = _expected_accuracy(pni, eot_square_attack(pni, x, y, eps=EPS, n_queries=60, eot_samples=4, seed=3), y)
    assert clean > 0.9
    assert eot < square - 0.1, f"EOT-Square {eot:.3f} vs Square {square:.3f}"


def test_eval_mode_by_default_and_state_restored(digits):
    model, x, y = digits
    pni = pni_copy(model)
    net = nn.Sequential(nn.BatchNorm2d(1), pni).train()
    modes = []
    net[0].register_forward_hook(lambda m, *_: modes.append(m.training))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    eot_square_attack(net, x[:8], y[:8], eps=EPS, n_queries=3, eot_samples=2)
    assert modes and not any(modes), "attacked in train mode"
    assert net.training and net[0].training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_through_evaluate_with_its_settings(digits):
    model, x, y = digits
    spec = AttackSpec("eot-square", eps=EPS, n_queries=20, eot_samples=3, seed=1)
    assert spec.name == "EOT-Square-20x3"
    assert "m=3" in spec.describe() and "queries=20" in spec.describe()
    (res,) = evaluate(model, (x, y), [spec], repeats=1, worst_of=1)
    direct = eot_square_attack(model, x, y, eps=EPS, n_queries=20, eot_samples=3, seed=1)
    with torch.no_grad():
        assert res.mean == float((model(direct).argmax(1) == y).float().mean())
    assert res.settings["kind"] == "eot-square" and res.settings["eot_samples"] == 3


def test_argument_checks():
    with pytest.raises(ValueError, match="eot-square needs eot_samples >= 2"):
        AttackSpec("eot-square")
    with pytest.raises(ValueError, match="eot_samples"):
        eot_square_attack(tiny_cnn(), torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), eot_samples=0)
    with pytest.raises(ValueError, match="image batch"):
        eot_square_attack(nn.Linear(4, 3), torch.rand(2, 4), torch.zeros(2, dtype=torch.long))
