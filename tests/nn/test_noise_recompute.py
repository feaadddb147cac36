"""Noise without hidden state (issue 21): a converted model's noise is a pure function of the generator
state at each layer call, so activation checkpointing recomputes the same bits, threads never take each
other's draws, and torch.func sees per-layer calls."""

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import pni_fast
import pni_fast.functional as fn
from pni_fast import rng
from pni_fast.nn import noise_calls


def _model(batch_noise: bool, pni: str = "channelwise") -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )
    pni_fast.convert(model, pni=pni, batch_noise=batch_noise)
    with torch.no_grad():
        model[0].alpha_w.fill_(2.0)  # noise large enough that another draw changes every gradient
    return model


class _Checkpointed(nn.Module):
    """The same layers, the middle ones run under ``mode``; its forward hooks are the converted model's."""

    def __init__(self, model: nn.Sequential, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, x):
        m = self.model
        h = m[1](m[0](x))
        if self.mode == "reentrant":
            h = checkpoint(lambda t: m[3](m[2](t)), h, use_reentrant=True)
        elif self.mode == "non-reentrant":
            h = checkpoint(lambda t: m[3](m[2](t)), h, use_reentrant=False)
        elif self.mode == "sequential":
            h = checkpoint_sequential(m[2:6], 2, h, use_reentrant=False)
            return m[6](h)
        else:
            h = m[3](m[2](h))
        return m[6](m[5](m[4](h)))


def _grads(model: nn.Module, loss, *extra):
    """.backward() (reentrant checkpointing refuses autograd.grad) and every gradient, cloned."""
    tensors = [*extra, *model.parameters()]
    for t in tensors:
        t.grad = None
    loss.backward()
    return [torch.zeros(()) if t.grad is None else t.grad.clone() for t in tensors]


def _step(model: nn.Module, x, seed: int):
    torch.manual_seed(seed)
    out = model(x)
    return out.detach(), _grads(model, (out**2).sum(), x)


@pytest.mark.parametrize("batch_noise", [True, False])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant", "sequential"])
def test_checkpoint_recomputes_the_same_noise(mode, batch_noise):
    model = _model(batch_noise)
    x = torch.randn(3, 4, requires_grad=True)
    plain = _Checkpointed(model, "none")
    if batch_noise:  # the converted model's hooks run on its own call: batch the wrapper the same way
        pni_fast.batch_weight_noise(plain, warn=False)
    want_out, want = _step(plain, x, 1)
    wrapped = _Checkpointed(model, mode)
    if batch_noise:
        pni_fast.batch_weight_noise(wrapped, warn=False)
    out, got = _step(wrapped, x, 1)
    assert torch.equal(out, want_out)
    for g, w in zip(got, want):
        assert torch.equal(g, w), "checkpointing changed a gradient"
    _, other = _step(plain, x, 2)
    assert not torch.equal(other[1], want[1]), "another seed gives other noise (the test can fail)"


def test_checkpointed_stage_of_resnet20_gives_the_gradients_of_the_plain_model():
    from pni_fast.models import resnet20

    model = resnet20(pni="layerwise")
    x = torch.rand(2, 3, 32, 32)

    def run(use_checkpoint: bool):
        stage = model.stage_1
        forward = stage.forward
        if use_checkpoint:
            stage.forward = lambda t: checkpoint(forward, t, use_reentrant=True)
        try:
            torch.manual_seed(7)
            return _grads(model, model(x).logsumexp(1).sum())
        finally:
            stage.__dict__.pop("forward", None)

    want, got = run(False), run(True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("reentrant", [True, False])
def test_pni_own_generator_refuses_a_recompute(reentrant):
    """torch.utils.checkpoint restores torch's generators only: with pni_fast.manual_seed the recompute would
    draw other noise, so it is refused with a message that says what to use."""
    model = _model(True)
    x = torch.randn(3, 4, requires_grad=True)
    pni_fast.manual_seed(3)
    try:
        model(x).sum().backward()  # no recompute: fine
        out = checkpoint(model, x, use_reentrant=reentrant)
        with pytest.raises(RuntimeError, match="while pni_fast.manual_seed / own_generator is active"):
            out.sum().backward()
    finally:
        pni_fast.manual_seed(None)


def _record_seeds(monkeypatch):
    """Record (thread, layer, seed) of every weight-noise call of a batched forward, through the one function
    layers draw with."""
    log = threading.local()
    real = rng.draw_seed

    def draw():
        s = real()
        log.seeds.append(s)
        return s

    monkeypatch.setattr(rng, "draw_seed", draw)
    return log


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_training_one_model_take_only_their_own_draws(threads, monkeypatch):
    """Every step's loss and gradients equal a single-thread replay with the seeds that thread's layers
    drew: no draw lost or taken by another thread, no exception."""
    torch.manual_seed(0)
    # a Conv1d is converted in place (its own forward reads a per-thread noisy weight), the Linear swapped
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.ReLU(), nn.Linear(4, 3))
    pni_fast.convert(model, pni="channelwise", noise="weight")
    log = _record_seeds(monkeypatch)
    params = list(model.parameters())
    steps, results, errors = 300, {}, []
    x = torch.randn(5, 1, 4)

    def work(t: int) -> None:
        log.seeds = []
        mine = []
        try:
            for _ in range(steps):
                start = len(log.seeds)
                loss = model(x).square().mean()
                grads = torch.autograd.grad(loss, params)
                mine.append((log.seeds[start:], loss.detach(), grads))
        except Exception as e:  # pragma: no cover - the failure is reported below
            errors.append(e)
        results[t] = mine

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors
    monkeypatch.undo()
    l0, l2 = model[0], model[3]
    for t in range(threads):
        assert len(results[t]) == steps
        for seeds, loss, grads in results[t][:: max(1, steps // 50)]:
            assert len(seeds) == 2, "each layer drew exactly one seed per step"
            w0 = fn.noisy_weight(l0.weight, l0.alpha_w, seed=seeds[0])
            w2 = fn.noisy_weight(l2.weight, l2.alpha_w, seed=seeds[1])
            ref = F.linear(F.relu(F.conv1d(x, w0, l0.bias).flatten(1)), w2, l2.bias).square().mean()
            assert torch.equal(loss, ref.detach())
            for g, w in zip(grads, torch.autograd.grad(ref, params)):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


def _per_sample_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    pni_fast.convert(model, pni="channelwise")  # batching installed (the default)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    return model, params, loss


def test_vmap_grad_per_sample_gradients_equal_a_loop():
    _, params, loss = _per_sample_setup()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    torch.manual_seed(11)
    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0), randomness="same")(params, x, y)
    for i in range(5):
        torch.manual_seed(11)  # the vmapped call drew one seed per layer from this state
        single = torch.func.grad(loss)(params, x[i], y[i])
        for k in params:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-5, atol=1e-6)


def test_vmap_with_different_randomness_is_refused_with_a_pni_message():
    _, params, loss = _per_sample_setup()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match=r"pni_fast: PNI noise under torch.func.vmap\(randomness='different'\)"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)


def test_no_module_holds_per_forward_state():
    """After a forward (also one that raised) no module attribute holds a draw and no stack entry is left."""
    model = _model(True)
    model(torch.randn(2, 4))
    assert noise_calls.active_draws() == []
    before = {id(m): set(vars(m)) for m in model.modules()}
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width: the forward raises after the pre-hook drew
    assert noise_calls.active_draws() == []
    assert {id(m): set(vars(m)) for m in model.modules()} == before
