"""Attacks run the model in eval mode by default, restore its state exactly, and refuse non-finite inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pni_fast.robust.attacks import carlini_wagner_l2, eot_pgd, fgsm, pgd
from pni_fast.robust.evaluate import AttackSpec, evaluate
from pni_fast.robust.interop import autoattack_rand, square_attack
from pni_fast.robust.modes import attack_mode, model_mode


class NoisyBN(nn.Module):
    """Conv + BatchNorm + a weight-noise layer drawn from torch's default generator (like PNI)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 5)
        self.modes: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.bn.training)
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        w = self.head.weight + 0.1 * torch.randn_like(self.head.weight)
        return F.linear(h, w, self.head.bias)


def _model() -> NoisyBN:
    torch.manual_seed(0)
    m = NoisyBN()
    # non-trivial running statistics, so eval and train mode compute different functions
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.num_batches_tracked.fill_(7)
    return m


def _data(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _buffers(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.named_buffers()}


def _ta(fn):
    """An attack that runs through torchattacks: skipped where it is not installed."""

    def run(m, x, y, **kw):
        pytest.importorskip("torchattacks", reason="torchattacks not installed (pip install --no-deps torchattacks)")
        return fn(m, x, y, **kw)

    return run


ATTACKS = {
    "fgsm": lambda m, x, y, **kw: fgsm(m, x, y, eps=0.1, **kw),
    "pgd": lambda m, x, y, **kw: pgd(
        m, x, y, eps=0.1, alpha=0.03, steps=3, generator=torch.Generator().manual_seed(5), **kw
    ),
    "pgd-l2-restarts": lambda m, x, y, **kw: pgd(
        m, x, y, eps=0.5, alpha=0.2, steps=2, norm="l2", restarts=2, generator=torch.Generator().manual_seed(5), **kw
    ),
    "eot_pgd": lambda m, x, y, **kw: eot_pgd(
        m, x, y, eps=0.1, alpha=0.03, steps=2, eot_samples=2, generator=torch.Generator().manual_seed(5), **kw
    ),
    "pgd-predictions": lambda m, x, y, **kw: pgd(
        m,
        x,
        None,
        targets="predictions",
        eps=0.1,
        alpha=0.03,
        steps=2,
        generator=torch.Generator().manual_seed(5),
        **kw,
    ),
    "cw": lambda m, x, y, **kw: carlini_wagner_l2(m, x, y, steps=3, search_steps=2, lr=0.05, **kw),
    "autoattack-rand": _ta(lambda m, x, y, **kw: autoattack_rand(m, x, y, eps=0.1, steps=2, eot_samples=2, **kw)),
    "square": _ta(lambda m, x, y, **kw: square_attack(m, x, y, eps=0.1, n_queries=5, **kw)),
}
TORCHATTACKS = ("autoattack-rand", "square")


@pytest.mark.parametrize("name", list(ATTACKS))
def test_train_mode_model_is_attacked_as_in_eval(name):
    attack = ATTACKS[name]
    x, y = _data()
    model = _model().train()
    before = _buffers(model)
    torch.manual_seed(11)
    xa_train = attack(model, x, y)
    assert model.modes and not any(model.modes), "the attack ran train-mode forwards"
    assert all(m.training for m in model.modules()), "training flags not restored"
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), f"attack changed buffer {k}"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())

    ref = _model().eval()
    torch.manual_seed(11)
    xa_eval = attack(ref, x, y)
    assert torch.equal(xa_train, xa_eval), "attacking a train-mode model differs from attacking it in eval"


def test_current_and_train_modes_run_train_forwards_but_keep_buffers():
    x, y = _data()
    for mode in ("current", "train"):
        model = _model().train() if mode == "current" else _model().eval()
        was = [m.training for m in model.modules()]
        before = _buffers(model)
        torch.manual_seed(11)
        xa = pgd(model, x, y, eps=0.1, alpha=0.03, steps=3, generator=torch.Generator().manual_seed(5), mode=mode)
        assert model.modes and all(model.modes), mode
        assert [m.training for m in model.modules()] == was
        for k, v in model.named_buffers():
            assert torch.equal(v, before[k]), f"{mode}: attack changed buffer {k}"
        torch.manual_seed(11)
        xe = pgd(_model().eval(), x, y, eps=0.1, alpha=0.03, steps=3, generator=torch.Generator().manual_seed(5))
        assert not torch.equal(xa, xe), "batch statistics and running statistics gave the same attack"


def test_mixed_flags_restored_per_submodule_even_on_error():
    model = _model().train()
    model.bn.eval()  # a frozen BatchNorm inside a training model
    x, y = _data()
    before = _buffers(model)
    calls = {"n": 0}

    def boom(module, inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    h = model.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            pgd(model, x, y, eps=0.1, steps=5, mode="train")
    finally:
        h.remove()
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


def test_model_mode_helper():
    model = _model().train()
    model.head.eval()
    with model_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    with model_mode(model, "current"):
        assert [m.training for m in model.modules()] == [True, True, True, False]
    with pytest.raises(ValueError, match="mode must be one of"):
        with model_mode(model, None):
            pass
    with pytest.raises(TypeError, match="nn.Module"):
        with attack_mode(lambda t: t):
            pass


def test_evaluate_attacks_in_eval_mode_and_restores():
    model = _model().train()
    before = _buffers(model)
    x, y = _data()
    evaluate(
        model,
        (x, y),
        [AttackSpec("clean"), AttackSpec("fgsm", eps=0.1), AttackSpec("pgd", eps=0.1, steps=2)],
        repeats=2,
    )
    assert not any(model.modes)
    assert all(m.training for m in model.modules())
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_non_finite_inputs_are_refused(name, bad):
    x, y = _data()
    x[2, 0, 3, 3] = bad
    model = _model().eval()
    with pytest.raises(ValueError, match=r"x must be finite, got 1 NaN/Inf"):
        ATTACKS[name](model, x, y)
    assert not model.modes, "the model ran on a non-finite input"


def test_mode_argument_errors():
    x, y = _data()
    model = _model()
    for fn in (
        lambda **kw: fgsm(model, x, y, **kw),
        lambda **kw: pgd(model, x, y, **kw),
        lambda **kw: carlini_wagner_l2(model, x, y, steps=1, search_steps=1, **kw),
    ):
        with pytest.raises(ValueError, match="mode must be one of"):
            fn(mode="test")
        with pytest.raises(ValueError, match="mode must be one of"):
            fn(mode=None)


@pytest.mark.parametrize("name", TORCHATTACKS)
def test_torchattacks_follow_our_mode_not_their_own(name):
    """torchattacks switches the whole model to eval itself and back to train() after; our `mode` governs instead."""
    x, y = _data()
    for mode in ("current", "train"):
        model = _model().train() if mode == "current" else _model().eval()
        was = [m.training for m in model.modules()]
        before = _buffers(model)
        ATTACKS[name](model, x, y, mode=mode)
        assert model.modes and all(model.modes), f"{mode}: torchattacks ran eval-mode forwards"
        assert [m.training for m in model.modules()] == was
        for k, v in model.named_buffers():
            assert torch.equal(v, before[k]), f"{mode}: attack changed buffer {k}"
    model = _model().train()
    model.bn.eval()  # a frozen BatchNorm in a training model: torchattacks' model.train() would unfreeze it
    ATTACKS[name](model, x, y, mode="current")
    assert model.modes and not any(model.modes)
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="mode must be one of"):
        ATTACKS[name](model, x, y, mode="test")
