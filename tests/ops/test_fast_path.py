"""The eager fast path (pni_fast/ops/fast_path.py: one C++ op per forward) equals the general path bit for bit.

Both paths run in one test with the same generator state; the general path is the separate ops
(sigma, finite checks, torch.randint seed, perturb) whose math the kernel tests check against the
numpy oracle, so equality here carries those checks over to the fast path.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import pni_fast
from pni_fast import _ext
from pni_fast.ops import fast_path as fused

pytestmark = pytest.mark.skipif(
    not (_ext.load() and _ext.has_op("noisy", "cpu")),
    reason="the compiled library (with pni_fast::noisy) is not loaded",
)


@contextlib.contextmanager
def general_path():
    saved = fused.ENABLED
    fused.ENABLED = False
    try:
        yield
    finally:
        fused.ENABLED = saved


def _both(run, seed: int = 7):
    """``run()`` on the fast path and on the general path from the same torch generator state; also the
    next value of that generator after each (the draw must advance it the same way)."""
    torch.manual_seed(seed)
    fast = run()
    fast_next = torch.rand(3)
    with general_path():
        torch.manual_seed(seed)
        slow = run()
        slow_next = torch.rand(3)
    return fast, slow, fast_next, slow_next


def _count_fused(monkeypatch) -> list:
    calls: list = []
    for name in ("noisy", "noisy_multi"):
        orig = getattr(fused, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(fused, name, spy)
    return calls


CASES = [
    ((16, 3, 3, 3), (1,), torch.float32, torch.float32),
    ((16, 3, 3, 3), (16, 1, 1, 1), torch.float32, torch.float32),
    ((10, 7), (10, 1), torch.float32, torch.float32),
    ((5, 2, 3), (5, 2, 3), torch.float32, torch.float32),  # elementwise
    ((33, 5), (33, 1), torch.float16, torch.float32),
    ((33, 5), (1,), torch.bfloat16, torch.bfloat16),
    ((1,), (1,), torch.float32, torch.float32),  # one element: sigma 0
    ((0, 4), (1,), torch.float32, torch.float32),
]


@pytest.mark.parametrize("shape,ashape,dtype,adtype", CASES)
def test_noisy_weight_fast_path_equals_general_path(shape, ashape, dtype, adtype, monkeypatch):
    w0 = torch.randn(shape).to(dtype)
    a0 = torch.rand(ashape).to(adtype) * 0.5
    g = torch.randn(shape).to(dtype)
    calls = _count_fused(monkeypatch)

    def run():
        w = w0.clone().requires_grad_()
        a = a0.clone().requires_grad_()
        out = pni_fast.noisy_weight(w, a)
        out.backward(g)
        return out.detach(), w.grad, a.grad

    fast, slow, fast_next, slow_next = _both(run)
    assert calls == ["noisy"], "the fast path was not taken"
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype and torch.equal(f, s)
    assert torch.equal(fast_next, slow_next), "the seed draw advanced torch's generator differently"


def test_explicit_seed_offset_and_inject_noise_equal_general_path():
    x0 = torch.randn(4, 6, 5, 5)
    a0 = torch.rand(6) * 0.3

    def run():
        x = x0.clone().requires_grad_()
        a = a0.clone().requires_grad_()
        out = pni_fast.inject_noise(x, a, seed=123, offset=9)
        (out * out).sum().backward()
        return out.detach(), x.grad, a.grad

    fast, slow, fast_next, slow_next = _both(run)
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
    assert torch.equal(fast_next, slow_next), "an explicit seed must not draw from torch's generator"
    # and the noise is the documented z for (seed, offset)
    z = pni_fast.randn(x0.shape, seed=123, offset=9)
    sigma = pni_fast.weight_sigma(x0)
    expected = x0 + (a0.view(1, 6, 1, 1) * sigma) * z
    torch.testing.assert_close(fast[0], expected, rtol=1e-6, atol=1e-6)


def test_own_generator_is_followed():
    w0 = torch.randn(8, 4)
    a = torch.tensor([0.2])
    outs = []
    for enabled in (True, False):
        fused.ENABLED = enabled
        try:
            pni_fast.manual_seed(11)
            outs.append(pni_fast.noisy_weight(w0, a))
        finally:
            fused.ENABLED = True
            pni_fast.manual_seed(None)
    assert torch.equal(outs[0], outs[1])


def test_noisy_weights_fast_path_equals_general_path(monkeypatch):
    shapes = [(16, 3, 3, 3), (16, 16, 3, 3), (32, 16, 1, 1), (10, 64)]
    ws0 = [torch.randn(s) for s in shapes]
    as0 = [torch.rand(s[0], *([1] * (len(s) - 1))) * 0.4 for s in shapes[:-1]] + [torch.tensor([0.3])]
    gs = [torch.randn(s) for s in shapes]
    calls = _count_fused(monkeypatch)

    def run():
        ws = [w.clone().requires_grad_() for w in ws0]
        als = [a.clone().requires_grad_() for a in as0]
        outs = pni_fast.noisy_weights(ws, als)
        torch.autograd.backward(outs[:3], gs[:3])  # the last output unused: its gradient is zero
        return [o.detach() for o in outs] + [w.grad for w in ws[:3]] + [a.grad for a in als]

    fast, slow, fast_next, slow_next = _both(run)
    assert calls == ["noisy_multi"]
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
    assert torch.equal(fast[-1], torch.zeros(1))
    assert torch.equal(fast_next, slow_next)


def test_mixed_dtypes_take_the_general_path(monkeypatch):
    calls = _count_fused(monkeypatch)
    ws = [torch.randn(4, 4), torch.randn(4, 4, dtype=torch.float64)]
    als = [torch.tensor([0.1]), torch.tensor([0.1], dtype=torch.float64)]
    outs = pni_fast.noisy_weights(ws, als, seed=3)
    assert calls == []
    assert torch.equal(outs[0], pni_fast.noisy_weight(ws[0], als[0], seed=3, offset=0))


def test_double_backward_on_the_fast_path_equals_general_path():
    x0 = torch.randn(6, 5)
    a0 = torch.tensor([0.3, 0.2, 0.1, 0.4, 0.5, 0.6]).view(6, 1)

    def run():
        x = x0.clone().requires_grad_()
        a = a0.clone().requires_grad_()
        out = pni_fast.noisy_weight(x, a, seed=5)
        (ga,) = torch.autograd.grad((out * x).sum(), a, create_graph=True)
        (gx,) = torch.autograd.grad(ga.square().sum(), x)
        return ga.detach(), gx

    fast, slow, _, _ = _both(run)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[1].abs().sum() > 0


@pytest.mark.parametrize(
    "bad,message",
    [
        ("nan_weight", "weight contains NaN or Inf"),
        ("inf_alpha", "alpha must be finite"),
        ("seed", r"seed must be in \[0, 2\^63\)"),
        ("offset", r"offset \+ ceil\(numel / 4\) must be < 2\^63"),
    ],
)
def test_errors_are_the_general_paths(bad, message):
    w = torch.randn(4, 3)
    a = torch.tensor([0.1])
    kwargs = {}
    if bad == "nan_weight":
        w[1, 1] = float("nan")
    elif bad == "inf_alpha":
        a = torch.tensor([float("inf")])
    elif bad == "seed":
        kwargs = dict(seed=-1)
    else:
        kwargs = dict(offset=2**63 - 2)
    for enabled in (True, False):
        fused.ENABLED = enabled
        try:
            with pytest.raises(ValueError, match=message):
                pni_fast.noisy_weight(w, a, **kwargs)
        finally:
            fused.ENABLED = True
    if bad != "offset":  # noisy_weights has no offset
        with pytest.raises(ValueError, match="weights contains NaN or Inf" if bad == "nan_weight" else message):
            pni_fast.noisy_weights([w], [a], **kwargs)


def test_no_grad_and_eval_give_the_same_values_without_a_graph():
    w0 = torch.randn(16, 3, 3, 3, requires_grad=True)
    a = torch.full((16, 1, 1, 1), 0.2, requires_grad=True)
    with torch.no_grad():
        out = pni_fast.noisy_weight(w0, a, seed=1)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, pni_fast.noisy_weight(w0, a, seed=1).detach())


def test_user_tensors_are_not_changed():
    w = torch.randn(7, 9).t()  # non-contiguous
    a = torch.rand(9, 1)
    before = (w.clone(), a.clone())
    out = pni_fast.noisy_weight(w, a, seed=2)
    assert torch.equal(w, before[0]) and torch.equal(a, before[1])
    assert out.data_ptr() != w.data_ptr()
    with general_path():
        assert torch.equal(out, pni_fast.noisy_weight(w, a, seed=2))


@pytest.mark.parametrize(
    "dtype,adtype,alpha_kind",
    [
        (torch.float32, torch.float32, "channelwise"),
        (torch.float32, torch.float32, "layerwise"),
        (torch.float32, torch.float32, "elementwise"),
        (torch.float16, torch.float32, "channelwise"),
        (torch.bfloat16, torch.bfloat16, "layerwise"),
    ],
)
def test_stored_noise_backward_equals_regenerated(dtype, adtype, alpha_kind, monkeypatch):
    """noisy_weights keeps the forward's noise for small models; the alpha gradients are the same bits as
    regenerating it (SAVE_NOISE_MAX_ELEMENTS=0) and as the general path."""
    shapes = [(16, 3, 3, 3), (16, 16, 3, 3), (64, 32, 3, 3), (10, 64)]  # 64x32x3x3: several reduction items
    ws0 = [torch.randn(s).to(dtype) for s in shapes]

    def alpha_for(s):
        if alpha_kind == "layerwise":
            return torch.tensor([0.3])
        if alpha_kind == "channelwise":
            return torch.rand(s[0], *([1] * (len(s) - 1))) * 0.4
        return torch.rand(s) * 0.4

    as0 = [alpha_for(s).to(adtype) for s in shapes]
    gs = [torch.randn(s).to(dtype) for s in shapes]

    def run():
        ws = [w.clone().requires_grad_() for w in ws0]
        als = [a.clone().requires_grad_() for a in as0]
        outs = pni_fast.noisy_weights(ws, als, seed=17)
        torch.autograd.backward(outs, gs)
        return [o.detach() for o in outs] + [a.grad for a in als] + [w.grad for w in ws]

    monkeypatch.setattr(fused, "SAVE_NOISE_MAX_ELEMENTS", 1 << 22)
    stored = run()
    monkeypatch.setattr(fused, "SAVE_NOISE_MAX_ELEMENTS", 0)
    regenerated = run()
    with general_path():
        general = run()
    for s, r, g in zip(stored, regenerated, general):
        assert torch.equal(s, r) and torch.equal(s, g)


def test_stored_noise_with_create_graph_and_unused_outputs(monkeypatch):
    monkeypatch.setattr(fused, "SAVE_NOISE_MAX_ELEMENTS", 1 << 22)
    ws0 = [torch.randn(8, 3, 3, 3), torch.randn(5, 8)]
    as0 = [torch.rand(8, 1, 1, 1), torch.tensor([0.2])]

    def run():
        ws = [w.clone().requires_grad_() for w in ws0]
        als = [a.clone().requires_grad_() for a in as0]
        outs = pni_fast.noisy_weights(ws, als, seed=3)
        loss = (outs[0] * ws[0]).sum()  # outs[1] unused: zero gradient for alpha 1
        ga = torch.autograd.grad(loss, als, create_graph=True)
        (gw,) = torch.autograd.grad(ga[0].square().sum(), ws[0])
        return [g.detach() for g in ga] + [gw]

    fast = run()
    with general_path():
        slow = run()
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
    assert torch.equal(fast[1], torch.zeros(1)) and fast[2].abs().sum() > 0
