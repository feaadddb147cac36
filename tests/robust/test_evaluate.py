"""evaluate: AutoAttack-rand and Square through torchattacks, PNI's noise stream under reseeding attacks, streaming."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

import pni_fast
from pni_fast import rng
from pni_fast.ops import fast_path as fused
from pni_fast.robust.evaluate import AttackSpec, evaluate
from pni_fast.robust.interop import autoattack_rand, square_attack

from toolkit_support import pni_copy, prototype_digits, tiny_cnn

HAVE_TA = importlib.util.find_spec("torchattacks") is not None
needs_ta = pytest.mark.skipif(not HAVE_TA, reason="torchattacks not installed (pip install --no-deps torchattacks)")
EPS = 0.5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return prototype_digits(32)


def _record_seeds(monkeypatch) -> list:
    """Every host seed PNI draws (rng_args and own_generator call rng.draw_seed). The eager fast path
    draws its seeds in C++ (the same values, tests/ops/test_fast_path.py), so it is switched off here."""
    monkeypatch.setattr(fused, "ENABLED", False)
    seen: list = []
    orig = rng.draw_seed

    def recording() -> int:
        s = orig()
        seen.append(s)
        return s

    monkeypatch.setattr(rng, "draw_seed", recording)
    return seen


# --------------------------------------------------------------------------- #
# the wrappers run torchattacks' own attacks, unchanged
# --------------------------------------------------------------------------- #
@needs_ta
def test_autoattack_rand_is_torchattacks_autoattack_rand(digits):
    import torchattacks

    model, x, y = digits
    x, y = x[:16], y[:16]
    ref = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="rand", n_classes=10, seed=0)(x, y)
    ours = autoattack_rand(model, x, y, eps=EPS, steps=10, eot_samples=20, seed=0)  # AutoAttack-rand's settings
    assert torch.equal(ours, ref)
    assert (ours - x).abs().max() <= EPS + 1e-6 and not torch.equal(ours, x)
    other = autoattack_rand(model, x, y, eps=EPS, steps=3, eot_samples=2, seed=0)
    assert not torch.equal(other, ref), "steps/eot_samples were not passed on"


@needs_ta
def test_square_is_torchattacks_square(digits):
    import torchattacks

    model, x, y = digits
    ref = torchattacks.Square(model, norm="Linf", eps=EPS, n_queries=30, n_restarts=1, seed=3)(x, y)
    ours = square_attack(model, x, y, eps=EPS, n_queries=30, seed=3)
    assert torch.equal(ours, ref)
    with torch.no_grad():
        assert (model(ours).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()


# --------------------------------------------------------------------------- #
# PNI's noise keeps flowing although torchattacks reseeds torch on every call
# --------------------------------------------------------------------------- #
@needs_ta
def test_successive_autoattack_calls_see_fresh_pni_noise(digits, monkeypatch):
    import torchattacks

    model = pni_copy(digits[0])
    x, y = digits[1][:16], digits[2][:16]
    seen = _record_seeds(monkeypatch)
    torch.manual_seed(0)
    calls = []
    for _ in range(3):
        seen.clear()
        autoattack_rand(model, x, y, eps=EPS, steps=3, eot_samples=2)
        calls.append(set(seen))
    assert all(len(c) >= 5 for c in calls)
    assert not (calls[0] & calls[1]) and not (calls[1] & calls[2]) and not (calls[0] & calls[2])
    assert rng._own_generator is None, "own_generator did not restore the previous source"

    # control: the same attack called directly repeats its noise after its manual_seed
    kw = dict(norm="Linf", eps=EPS, steps=3, n_restarts=1, seed=0, eot_iter=2)
    atk = torchattacks.MultiAttack(
        [torchattacks.APGD(model, loss="ce", **kw), torchattacks.APGD(model, loss="dlr", **kw)]
    )
    direct = []
    for _ in range(3):
        seen.clear()
        atk(x, y)
        direct.append(list(seen))
    assert len(direct[0]) >= 5
    assert direct[1] == direct[2], "without own_generator the noise should repeat exactly from the second call on"


@needs_ta
@pytest.mark.parametrize("kind", ["autoattack-rand", "square"])
def test_evaluate_repeats_draw_different_noise(digits, monkeypatch, kind):
    model = pni_copy(digits[0])
    x, y = digits[1][:16], digits[2][:16]
    spec = AttackSpec(kind, eps=EPS, steps=2, eot_samples=2, n_queries=10)
    seen = _record_seeds(monkeypatch)
    per_repeat: list = []
    run = AttackSpec.run

    def spy(self, *a, **kw):
        seen.clear()
        out = run(self, *a, **kw)
        per_repeat.append(set(seen))
        return out

    monkeypatch.setattr(AttackSpec, "run", spy)
    torch.manual_seed(0)
    evaluate(model, (x, y), [spec], repeats=3, batch_size=16)
    assert len(per_repeat) == 3 and all(per_repeat)
    for i in range(3):
        for j in range(i):
            assert not (per_repeat[i] & per_repeat[j]), (i, j)


@needs_ta
@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y: autoattack_rand(m, x, y, eps=EPS, steps=2, eot_samples=2),
        lambda m, x, y: square_attack(m, x, y, eps=EPS, n_queries=10),
    ],
    ids=["autoattack-rand", "square"],
)
def test_callers_rng_stream_is_kept(digits, attack):
    """The attack reseeds torch; afterwards the caller's stream continues as if only PNI's one seed draw happened."""
    model, x, y = digits
    torch.manual_seed(5)
    attack(model, x[:8], y[:8])
    after = torch.rand(4)
    torch.manual_seed(5)
    rng.draw_seed()
    assert torch.equal(after, torch.rand(4))


# --------------------------------------------------------------------------- #
# evaluate reports them next to PGD and EOT-PGD
# --------------------------------------------------------------------------- #
@needs_ta
def test_evaluate_reports_autoattack_rand_and_square(digits):
    model, x, y = digits
    pni = pni_copy(model)
    specs = [
        AttackSpec("clean"),
        AttackSpec("pgd", eps=EPS, alpha=0.1, steps=1),
        AttackSpec("eot-pgd", eps=EPS, alpha=0.1, steps=1, eot_samples=2),
        AttackSpec("autoattack-rand", eps=EPS, steps=3, eot_samples=2, restarts=1, seed=1),
        AttackSpec("square", eps=EPS, n_queries=50, p_init=0.5, seed=2),
    ]
    torch.manual_seed(0)
    res = evaluate(pni, (x, y), specs, repeats=3, batch_size=32)
    assert [r.attack for r in res] == ["clean", "PGD-1", "EOT-PGD-1x2", "AA-rand-3x2", "Square-50"]
    clean, _, _, aa, sq = res
    assert all(len(r.accuracies) == 3 and r.n_examples == 32 for r in res)
    assert aa.mean < clean.mean - 0.3 and sq.mean < clean.mean
    assert res[1].std > 0, "PGD on the PNI model gave the same accuracy three times"
    assert "APGD-CE, then APGD-DLR" in aa.description and "EOT samples=2" in aa.description
    assert "steps=3" in aa.description and "seed=1" in aa.description
    assert "gradient-free" in sq.description and "queries=50" in sq.description and "p_init=0.5" in sq.description
    assert aa.settings["kind"] == "autoattack-rand" and sq.settings["n_queries"] == 50

    det = evaluate(model, (x, y), specs[3:], repeats=2, batch_size=32)
    assert all(r.std == 0.0 for r in det), "a deterministic model must give std 0 (attack seeds fixed per repeat)"


def test_attackspec_checks_for_the_new_kinds():
    with pytest.raises(ValueError, match="autoattack-rand needs eot_samples >= 2"):
        AttackSpec("autoattack-rand")
    with pytest.raises(ValueError, match="n_queries"):
        AttackSpec("square", n_queries=0)
    with pytest.raises(ValueError, match="p_init"):
        AttackSpec("square", p_init=1.5)
    assert AttackSpec("square").name == "Square-5000"


def test_missing_torchattacks_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks -> ImportError
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    for fn in (autoattack_rand, square_attack):
        with pytest.raises(ImportError, match="pip install torchattacks"):
            fn(tiny_cnn(), x, y)


@needs_ta
def test_torchattacks_wrappers_need_image_batches():
    with pytest.raises(ValueError, match=r"x must be an image batch \[N, C, H, W\]"):
        square_attack(nn.Linear(4, 3), torch.rand(2, 4), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------- #
# streaming
# --------------------------------------------------------------------------- #
SPECS = [AttackSpec("clean"), AttackSpec("fgsm", eps=0.1), AttackSpec("pgd", eps=0.1, alpha=0.05, steps=1, restarts=2)]


def _materialized(model, batches, specs, repeats):
    """Oracle: the pre-streaming algorithm (all batches in a list, then attacked spec by spec, repeat by repeat)."""
    out = []
    for spec in specs:
        accs = []
        for _ in range(repeats):
            gen = torch.Generator().manual_seed(spec.seed)
            correct = sum(int((model(spec.run(model, xb, yb, gen)).argmax(1) == yb).sum()) for xb, yb in batches)
            accs.append(correct / sum(len(b[1]) for b in batches))
        out.append(accs)
    return out


def test_streamed_inputs_give_the_materialized_results(digits):
    model, x, y = digits
    pni = pni_copy(model, alpha=1.0)
    batches = [(x[s : s + 12], y[s : s + 12]) for s in range(0, 32, 12)]
    torch.manual_seed(3)
    want = _materialized(pni, batches, SPECS, 2)
    # a DataLoader draws a seed from torch's generator on every pass unless it has its own generator
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=12, generator=torch.Generator().manual_seed(0)
    )
    split = pni_fast.robust.data.Split(x, y)
    for data in ((x, y), split, batches, loader):
        torch.manual_seed(3)
        # worst_of=1: one classifying pass per batch, as in the oracle (k passes would shift the noise stream)
        got = [r.accuracies for r in evaluate(pni, data, SPECS, repeats=2, batch_size=12, worst_of=1)]
        assert got == want, type(data).__name__
    assert len({a for accs in want for a in accs}) > 1  # the noise does change the answers


def test_batches_are_streamed_not_held(digits, monkeypatch):
    model, x, y = digits
    events: list = []

    class Logged:
        def __iter__(self):
            for i, s in enumerate(range(0, 32, 16)):
                events.append(("load", i))
                yield x[s : s + 16], y[s : s + 16]

    h = model.register_forward_pre_hook(lambda m, a: events.append(("forward", a[0].shape[0])))
    try:
        evaluate(model, Logged(), [AttackSpec("clean")], repeats=2)
    finally:
        h.remove()
    loads = [i for i, e in enumerate(events) if e[0] == "load"]
    assert len(loads) == 4
    assert all(events[i + 1][0] == "forward" for i in loads), "a batch was loaded before the previous was used"

    # in-memory inputs: each batch is converted right before it is attacked
    from pni_fast.robust import evaluate as ev

    converted: list = []
    real = ev.to_unit_float
    monkeypatch.setattr(ev, "to_unit_float", lambda t: (converted.append(len(events)), real(t))[1])
    events.clear()
    h = model.register_forward_pre_hook(lambda m, a: events.append(("forward", a[0].shape[0])))
    try:
        evaluate(model, (x, y), [AttackSpec("clean")], repeats=1, batch_size=16, worst_of=1)
    finally:
        h.remove()
    assert converted == [0, 1]


def test_streaming_input_errors(digits):
    model, x, y = digits
    with pytest.raises(TypeError, match="one-shot iterator"):
        evaluate(model, ((x[s : s + 8], y[s : s + 8]) for s in range(0, 32, 8)), [AttackSpec("clean")])
    with pytest.raises(TypeError, match=r"\(x, y\) batches, got Tensor as batch 0"):
        evaluate(model, [x], [AttackSpec("clean")])
    with pytest.raises(ValueError, match=r"data batch 0: expected x \[N, ...\] and integer labels"):
        evaluate(model, [[x[:2], x[2:4]]], [AttackSpec("clean")])  # [x, y] mistaken for a list of batches
    with pytest.raises(ValueError, match=r"y must have shape \[32\]"):
        evaluate(model, (x, y[:5]), [AttackSpec("clean")])
    with pytest.raises(TypeError, match="data must be a Split"):
        evaluate(model, 3, [AttackSpec("clean")])
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, [], [AttackSpec("clean")])
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, (x[:0], y[:0]), [AttackSpec("clean")])

    class Shrinking:
        n = 32

        def __iter__(self):
            Shrinking.n -= 8
            yield x[: self.n], y[: self.n]

    with pytest.raises(ValueError, match="same examples on every pass"):
        evaluate(model, Shrinking(), [AttackSpec("clean")], repeats=2)
