"""The memoized argument checks of noisy_weight / noisy_weights (pni_fast/functional.py).

The checks are memoized by each tensor's shape, dtype and device, so the memo must never let a call
through that the plain checks refuse, must re-check when a tensor's metadata changes under the same
Python object (``param.data = ...``), and must give exactly the plain checks' offsets and inners.
"""

import pytest
import torch

import pni_fast
from pni_fast import functional


@pytest.fixture(autouse=True)
def _fresh_memo():
    functional._PLANS.clear()
    yield
    functional._PLANS.clear()


def _layers():
    torch.manual_seed(0)
    ws = [torch.randn(16, 3, 3, 3), torch.randn(32, 16, 3, 3), torch.randn(10, 64), torch.randn(7)]
    alphas = [
        torch.full((16, 1, 1, 1), 0.25),
        torch.full((1,), 0.25),
        torch.full((10, 64), 0.25),
        torch.full((1,), 0.1),
    ]
    return ws, alphas


def test_plan_equals_the_unmemoized_checks():
    ws, alphas = _layers()
    expected = functional._weight_plan(ws, alphas)
    assert expected == ([0, 108, 1260, 1420], [27, 1, 1, 1], 1422)
    assert functional.weight_plan(ws, alphas) == expected  # fills the memo
    first = functional.weight_plan(ws, alphas)  # from the memo
    assert first == expected
    first[0].append(99)  # the caller's lists are its own
    assert functional.weight_plan(ws, alphas) == expected
    assert functional.checked_weight_inner(ws[0], alphas[0]) == 27
    assert functional.checked_weight_inner(ws[0], alphas[0]) == 27


def test_bad_input_raises_on_every_call():
    ws, alphas = _layers()
    alphas[1] = torch.full((5,), 0.25)  # fits no mode of a [32, 16, 3, 3] weight
    for _ in range(3):
        with pytest.raises(ValueError, match="alpha must have 1 element"):
            pni_fast.noisy_weights(ws, alphas, seed=1)
        with pytest.raises(ValueError, match="alpha must have 1 element"):
            pni_fast.noisy_weight(ws[1], alphas[1], seed=1)


def test_metadata_change_under_the_same_parameter_is_rechecked():
    conv = torch.nn.Conv2d(3, 4, 3)
    alpha = torch.nn.Parameter(torch.full((4, 1, 1, 1), 0.25))
    pni_fast.noisy_weights([conv.weight], [alpha], seed=1)
    pni_fast.noisy_weight(conv.weight, alpha, seed=1)
    with torch.no_grad():
        conv.weight.data = conv.weight.data.double()  # same Parameter object, new dtype
    with pytest.raises(TypeError, match=r"alpha must have dtype torch.float64"):
        pni_fast.noisy_weights([conv.weight], [alpha], seed=1)
    with pytest.raises(TypeError, match=r"alpha must have dtype torch.float64"):
        pni_fast.noisy_weight(conv.weight, alpha, seed=1)
    with torch.no_grad():
        conv.weight.data = torch.randn(6, 3, 3, 3)  # new shape: alpha no longer channelwise
    with pytest.raises(ValueError, match="alpha must have 1 element"):
        pni_fast.noisy_weights([conv.weight], [alpha], seed=1)


def test_memoized_results_equal_the_unmemoized_path():
    ws, alphas = _layers()
    first = pni_fast.noisy_weights(ws, alphas, seed=7)
    again = pni_fast.noisy_weights(ws, alphas, seed=7)  # checks from the memo
    functional._PLANS.clear()
    fresh = pni_fast.noisy_weights(ws, alphas, seed=7)
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_memo_stays_bounded():
    for n in range(functional._PLANS_MAX + 10):
        w = torch.randn(n + 2)
        functional.checked_weight_inner(w, torch.ones(1))
    assert len(functional._PLANS) <= functional._PLANS_MAX


def test_non_tensor_arguments_get_the_plain_errors():
    with pytest.raises(TypeError, match=r"weights\[0\] must be a torch.Tensor"):
        pni_fast.noisy_weights([[1.0, 2.0]], [torch.ones(1)])
    with pytest.raises(TypeError, match="alpha must be a torch.Tensor"):
        pni_fast.noisy_weight(torch.randn(3), 0.25)
