"""Every bad input of the op contract (docs/ops.md) against every backend runnable here.

The rules and messages live once, in ``pni_fast/contract.py`` (RULES); the Python backends call it
and the C++ kernels print its messages through the generated ``csrc/check_messages.h``. Here each
bad input goes to each backend that takes CPU tensors (tests/support/kernels.py, from the registry: the C++
CPU kernels, the pure-PyTorch ops, the Triton ops under the interpreter), to its real kernel and to
its fake kernel (FakeTensorMode, ``fake``), and must raise the rule's exception with the rule's
message; the only difference allowed is the op's name, which carries the backend's suffix
(``perturb_triton: rng_state must ...``). Boundary inputs that the contract accepts must pass
everywhere, so the conditions agree too, not only the words. The CUDA kernels call the same
``csrc/checks.h`` functions as the CPU kernels (see that file), so they are covered by construction.
The inputs: tests/support/op_check_cases.py; the rules as written and the generated header:
tests/test_contract.py.

The ops of a family share one check path (csrc/checks.h, contract.check_noise / check_perturb /
check_perturb_multi): every case runs on the family's first op, a few on its siblings to show they
are wired to the same check, with their own op name and ``vname``:

=====================================================  ===========================================
behaviour                                              cases
=====================================================  ===========================================
each rule: exception type and full message             every case of op_check_cases.CASES on the
(bad inputs), each accepted boundary passes            family's first op: noise, perturb,
                                                       perturb_multi (each backend, real and fake)
rng_words / rng_uniform (C++) share noise's checks     counter-limit, state-int32, state-counter,
(arguments, rng_state tensor, its values, boundary)    ok-counter
perturb_alpha_grad shares perturb's ("grad ..." in     tiling-inner, state-int32, state-counter,
its messages)                                          ok-empty-inner0
perturb_alpha_grad_multi shares perturb_multi's        lengths-alphas, tiling0, state-int32,
("grads" / "grads[0]: " in its messages)               state-counter, ok-zero-size
rng_state values (read on the host): real kernels      the ``data`` cases; a fake tensor has no
only                                                   values
every op-scope rule hit on every backend that checks   test_chosen_cases_hit_every_rule
it (real and fake)
=====================================================  ===========================================
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pni_fast
from pni_fast.contract import RULES, message
from pni_fast.ops import registry

import kernels
from op_check_cases import CASES, Case, defaults

for _name in kernels.runnable("cpu"):  # the first call through a backend registers its ops' fake kernels
    pni_fast.randn(4, seed=1, backend=_name)

RNG_OPS = ("rng_words", "rng_uniform")  # the compiled library's, beside noise (same checks)
# The cases the sibling ops of a family run (the first op runs every case of the family).
SIBLING_CASES = {
    "noise": ("counter-limit", "state-int32", "state-counter", "ok-counter"),
    "perturb": ("tiling-inner", "state-int32", "state-counter", "ok-empty-inner0"),
    "multi": ("lengths-alphas", "tiling0", "state-int32", "state-counter", "ok-zero-size"),
}
# Rules some backends do not check: the list ops' own (a backend without list ops: the functional layer
# loops over tensors) and the rng_state values (a fake kernel has no values to read).
LIST_RULES = {"list_lengths", "seeds_length", "seeds_rng_state"}
VALUE_RULES = {"rng_state_seed", "rng_state_base", "state_offset", "state_counter_limit"}


def family_ops(name: str) -> dict[str, tuple[str, ...]]:
    """The ops of backend ``name`` per family (from the registry), the family's first op first."""
    b = registry.REGISTRY[name]
    ops = {"noise": (b.noise,) + (RNG_OPS if b.cpp else ()), "perturb": (b.perturb, b.alpha_grad)}
    if b.perturb_multi is not None:
        ops["multi"] = (b.perturb_multi, b.alpha_grad_multi)
    return ops


def _vname(name: str, op: str) -> str:
    b = registry.REGISTRY[name]
    return "grad" if op in (b.alpha_grad, b.alpha_grad_multi) else "v"


def _expected(case: Case, op: str, vname: str) -> tuple[type, str]:
    lists = vname + "s"
    prefix = case.prefix.format(op=op, list=lists)
    fields = dict(case.fields)
    if case.rule == "list_lengths":
        fields = dict(zip(("n_v", "n_alpha", "n_sigma", "n_offset", "n_inner"), fields.pop("counts")), lists=lists)
    fields.setdefault("vname", vname)
    wanted = [f for f in RULES[case.rule].fields]
    return RULES[case.rule].error, message(case.rule, prefix, **{k: fields[k] for k in wanted})


def _args(case: Case) -> list:
    a = {**defaults(case.family), **case.args}
    if case.family == "noise":
        return [a["like"], a["seed"], a["offset"], a["rng_state"]]
    if case.family == "perturb":
        return [a["v"], a["alpha"], a["sigma"], a["seed"], a["offset"], a["inner"], a["rng_state"]]
    return [a["vs"], a["alphas"], a["sigmas"], a["seeds"], a["offsets"], a["inners"], a["rng_state"]]


def _call(fake: bool, op: str, args: list):
    overload = getattr(torch.ops.pni_fast, op).default
    if not fake:
        # Straight to the CPU kernel, past autograd and past the Meta dispatch that a meta argument
        # (the device-mismatch cases) would otherwise select.
        return overload.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)
    with FakeTensorMode() as mode:

        def to_fake(x):
            if isinstance(x, torch.Tensor):
                return mode.from_tensor(x)
            if isinstance(x, list):
                return [to_fake(y) for y in x]
            return x

        return overload(*[to_fake(x) for x in args])


def _params():
    for backend in kernels.backend_params("cpu", fake=True):
        name, fake = backend.values
        for family, ops in family_ops(name).items():
            for op in ops:
                for case in CASES:
                    if case.family != family or (case.data and fake):
                        continue
                    if op != ops[0] and case.name not in SIBLING_CASES[family]:
                        continue
                    short = op.removesuffix(f"_{name}")
                    yield kernels.extend(backend, case, op, id=f"{short}-{case.name}")


PARAMS = list(_params())


@pytest.mark.parametrize("backend,fake,case,op", PARAMS)
def test_bad_input_same_error_everywhere(backend, fake, case, op):
    args = _args(case)
    if case.rule is None:
        _call(fake, op, args)  # the contract accepts it
        return
    error, expected = _expected(case, op, _vname(backend, op))
    with pytest.raises(Exception) as info:
        _call(fake, op, args)
    assert type(info.value) is error and str(info.value) == expected, (
        f"{op} on {backend}{' (fake)' * fake}: got {type(info.value).__name__}: {info.value}\n"
        f"expected {error.__name__}: {expected}"
    )


def test_chosen_cases_hit_every_rule():
    """The trimming above drops no rule: each backend (real and fake) meets every op-scope rule it
    checks, its family's first op every case of the family, and each sibling op a rejected input."""
    op_rules = {n for n, r in RULES.items() if r.scope == "op"}
    chosen: dict[tuple, list[tuple[Case, str]]] = {}
    for p in PARAMS:
        name, fake, case, op = p.values
        chosen.setdefault((name, fake), []).append((case, op))
    assert set(chosen) == {tuple(p.values) for p in kernels.backend_params("cpu", fake=True)}
    for (name, fake), pairs in chosen.items():
        ops = family_ops(name)
        expected = op_rules - (set() if "multi" in ops else LIST_RULES) - (VALUE_RULES if fake else set())
        hit = {case.rule for case, _ in pairs if case.rule}
        assert hit == expected, f"{name}{' (fake)' * fake}: missing {expected - hit}, unexpected {hit - expected}"
        for family, family_op_names in ops.items():
            every = {c.name for c in CASES if c.family == family and not (c.data and fake)}
            assert set(SIBLING_CASES[family]) <= {c.name for c in CASES if c.family == family}
            assert {case.name for case, op in pairs if op == family_op_names[0]} == every, (name, fake, family)
            for op in family_op_names[1:]:
                assert any(case.rule for case, o in pairs if o == op), f"{op}: no rejected input"
