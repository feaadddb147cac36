"""The op contract's rules as written: every rule has a bad input (tests/support/op_check_cases.py) that
tests/backends/test_contract_per_backend.py sends to every backend, the messages read as docs/ops.md
documents them, and the C++ kernels' generated ``csrc/check_messages.h`` matches
``pni_fast/contract.py`` (RULES).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import pni_fast
from pni_fast.contract import RULES, message

from op_check_cases import CASES
from repo import ROOT


def test_every_rule_has_a_case():
    """A new rule without a bad input in tests/support/op_check_cases.py would go untested on the backends."""
    assert {c.rule for c in CASES if c.rule} == {name for name, r in RULES.items() if r.scope == "op"}


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "general-path"])
def test_public_rules_raise_their_messages(monkeypatch, fast):
    """The public functions' own rules (scope "public": argument types, finite values): the Python path and
    the C++ fast path raise RULES' type and message (the fast path through the generated header)."""
    from pni_fast.ops import fast_path as fused

    monkeypatch.setattr(fused, "ENABLED", fast)
    public = {name for name, r in RULES.items() if r.scope == "public"}
    assert public == {"tensor_type", "int_type", "tensor_finite", "alpha_finite"}
    with pytest.raises(RULES["int_type"].error) as e:
        pni_fast.noisy_weight(torch.ones(2), torch.tensor([0.1]), seed=1.5)
    assert str(e.value) == message("int_type", name="seed", type="float")
    with pytest.raises(RULES["tensor_type"].error) as e:
        pni_fast.noisy_weight([1.0, 2.0], torch.tensor([0.1]))
    assert str(e.value) == message("tensor_type", name="weight", type="list")
    with pytest.raises(RULES["tensor_type"].error) as e:
        pni_fast.noisy_weight(torch.ones(2), 0.1)
    assert str(e.value) == message("tensor_type", name="alpha", type="float")
    w = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    with pytest.raises(RULES["tensor_finite"].error) as e:
        pni_fast.noisy_weight(w, torch.tensor([0.1]))
    assert str(e.value) == message("tensor_finite", name="weight")
    with pytest.raises(RULES["tensor_finite"].error) as e:
        pni_fast.noisy_weights([torch.ones(4), w], [torch.tensor([0.1])] * 2)
    assert str(e.value) == message("tensor_finite", name="weights")
    with pytest.raises(RULES["alpha_finite"].error) as e:
        pni_fast.noisy_weight(torch.randn(2, 2), torch.tensor([float("inf")]))
    assert str(e.value) == message("alpha_finite")


def test_messages_read_as_documented():
    """A few messages spelled out: the notation the contract documents (docs/ops.md)."""
    assert message("seed", seed=-1) == "seed must be in [0, 2^63), got -1"
    assert (
        message("counter_limit", "vs[1]: ", offset=5, numel=9)
        == "vs[1]: offset + ceil(numel / 4) must be < 2^63, got offset=5, numel=9"
    )
    assert (
        message(
            "alpha_dtype", dtype=torch.float16, vname="v", or_float32=" or torch.float32", alpha_dtype=torch.float64
        )
        == "alpha must have dtype torch.float16 (the dtype of v) or torch.float32, got torch.float64"
    )


def test_generated_header_is_current():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import gen_check_messages
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "csrc", "check_messages.h")) as f:
        assert f.read() == gen_check_messages.render(), "run: python scripts/gen_check_messages.py"
