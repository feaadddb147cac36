"""The op contract's rules as written: every rule has a bad input (tests/op_check_cases.py) that
tests/test_op_checks_per_backend.py sends to every backend, the messages read as docs/ops.md
documents them, and the C++ kernels' generated ``csrc/check_messages.h`` matches
``pni_fast/op_checks.py`` (RULES).
"""

from __future__ import annotations

import os
import sys

import torch

from pni_fast.op_checks import RULES, message

from op_check_cases import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_rule_has_a_case():
    """A new rule without a bad input in tests/op_check_cases.py would go untested on the backends."""
    assert {c.rule for c in CASES if c.rule} == set(RULES)


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
