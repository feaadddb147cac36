"""Worst-of-k accuracy: an attacked example counts as correct only if k noisy passes all classify it correctly.

Checked against an independent count on a model whose passes are scripted, on deterministic and PNI models,
for AutoAttack-rand's final verdict, and in the tables the CLI and the demo print.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import pni_fast
from pni_fast.robust.evaluate import AttackSpec, EvalResult, evaluate, format_results

from toolkit_support import Scripted, tiny_cnn

HAVE_TA = importlib.util.find_spec("torchattacks") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=48):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_matches_an_independent_count_on_scripted_passes():
    """Clean accuracy, R=2 repeats, k=4: pass j of repeat r is table[4r + j]; counted by hand here."""
    n, k, r = 40, 4, 2
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (n,), generator=g)
    table = torch.randn(k * r, n, 3, generator=g)
    table[:, :, :] += 2.0 * nn.functional.one_hot(y, 3)  # mostly right, sometimes wrong
    model = Scripted(table)
    (res,) = evaluate(model, (torch.rand(n, 2), y), [AttackSpec("clean")], repeats=r, worst_of=k, batch_size=n)
    assert model.calls == k * r
    right = table.argmax(2) == y  # [pass, example]
    for rep in range(r):
        passes = right[rep * k : (rep + 1) * k]
        assert res.accuracies[rep] == pytest.approx(float(passes[0].float().mean()))
        assert res.worst_accuracies[rep] == pytest.approx(float(passes.all(0).float().mean()))
    assert res.worst_of == k and res.worst < res.mean
    assert res.worst == pytest.approx(sum(res.worst_accuracies) / r)


def test_batches_are_counted_separately():
    """Two batches: every batch is classified by its own k passes (pass order: batch 0's k, then batch 1's)."""
    n, k = 10, 3
    g = torch.Generator().manual_seed(6)
    y = torch.zeros(n, dtype=torch.long)
    table = torch.randn(2 * k, 5, 2, generator=g)
    model = Scripted(table)
    (res,) = evaluate(model, (torch.rand(n, 2), y), [AttackSpec("clean")], repeats=1, worst_of=k, batch_size=5)
    right = table.argmax(2) == 0
    expected = (int(right[:k].all(0).sum()) + int(right[k:].all(0).sum())) / n
    assert res.worst_accuracies == [pytest.approx(expected)]


def test_deterministic_model_scores_the_same_twice():
    model = tiny_cnn(seed=0).eval()
    x, y = _data()
    specs = [AttackSpec("clean"), AttackSpec("pgd", eps=0.1, alpha=0.03, steps=2)]
    for res in evaluate(model, (x, y), specs, repeats=1, worst_of=5):
        assert res.worst == res.mean and res.worst_of == 5


def test_pni_model_worst_is_at_most_the_mean_in_every_repeat():
    model = pni_fast.convert(tiny_cnn(seed=0), pni="layerwise", noise="weight", alpha_init=1.0).eval()
    x, y = _data(64)
    specs = [AttackSpec("clean"), AttackSpec("pgd", eps=0.05, alpha=0.02, steps=2)]
    res = evaluate(model, (x, y), specs, repeats=3, worst_of=8)
    for r in res:
        assert all(w <= a for w, a in zip(r.worst_accuracies, r.accuracies))
    assert res[0].worst < res[0].mean, "strong noise: some example must be misclassified by one of 8 passes"
    # more passes can only remove examples: worst-of-1 is the mean
    (one,) = evaluate(model, (x, y), specs[:1], repeats=3, worst_of=1)
    assert one.worst_accuracies == one.accuracies


@pytest.mark.skipif(not HAVE_TA, reason="torchattacks not installed (pip install --no-deps torchattacks)")
def test_autoattack_rand_final_verdict_over_k_passes(monkeypatch):
    """AA-rand's adversarial batch is classified by k fresh passes after the attack (counted with a hook)."""
    model = pni_fast.convert(tiny_cnn(seed=0), pni="layerwise", noise="weight", alpha_init=1.0).eval()
    x, y = _data(16)
    spec = AttackSpec("autoattack-rand", eps=0.1, steps=2, eot_samples=2)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    orig = AttackSpec.run

    def run(self, *a, **kw):
        out = orig(self, *a, **kw)
        calls.clear()  # count only the passes after the attack
        return out

    monkeypatch.setattr(AttackSpec, "run", run)
    (res,) = evaluate(model, (x, y), [spec], repeats=1, worst_of=6)
    handle.remove()
    assert len(calls) == 6
    assert res.worst <= res.mean and res.attack == "AA-rand-2x2"


def test_eval_result_defaults_and_checks():
    r = EvalResult("clean", {}, "clean: no attack", [0.5, 0.7], 10)
    assert r.worst_accuracies == [0.5, 0.7] and r.worst == r.mean and r.worst_of == 1
    with pytest.raises(ValueError, match="worst_accuracies is required"):
        EvalResult("clean", {}, "", [0.5], 10, worst_of=3)
    with pytest.raises(ValueError, match="1 values for 2 repeats"):
        EvalResult("clean", {}, "", [0.5, 0.6], 10, [0.4], 3)
    with pytest.raises(ValueError, match="worst_of"):
        evaluate(tiny_cnn(seed=0), _data(4), [AttackSpec("clean")], worst_of=0)


def test_table_shows_both_with_the_definition():
    rows = {
        "noisy": [EvalResult("clean", {}, "clean: no attack", [0.9, 0.8], 10, [0.7, 0.5], 10)],
        "plain": [EvalResult("clean", {}, "clean: no attack", [0.95], 10, [0.95], 10)],
    }
    text = format_results(rows)
    header, _, noisy, plain = text.splitlines()[:4]
    assert header.split()[1:] == ["clean", "worst-10"]
    assert noisy.split()[-1] == "60.0" and "85.0 +/-  5.0" in noisy
    assert plain.split()[-1] == "95.0"
    assert "worst-10: worst-of-10 accuracy" in text and "all 10 noisy passes" in text
    # k = 1 everywhere: no worst column unless asked for
    single = {"m": [EvalResult("clean", {}, "clean: no attack", [0.9], 10)]}
    assert "worst" not in format_results(single) and "worst-1" in format_results(single, worst=True)


def test_cli_parses_worst_of_and_eot_square():
    from pni_fast.cli import build_parser
    from pni_fast.robust.cli_eval import eval_specs

    args = build_parser().parse_args(["eval", "--checkpoint", "c.pt", "--worst-of", "7", "--mc-curve", "1,4"])
    assert args.worst_of == 7 and args.mc_curve == "1,4" and args.square_eot_samples == 4
    assert build_parser().parse_args(["demo"]).worst_of == 10
    specs = eval_specs(["square", "eot-square"], 0.1, 0.025, 5, 1, 8, "labels", square={"n_queries": 30})
    assert [s.name for s in specs] == ["Square-30", "EOT-Square-30x8"]
    specs = eval_specs(["eot-square"], 0.1, 0.025, 5, 1, 8, "labels", eot_square={"eot_samples": 3})
    assert specs[0].eot_samples == 3
