"""Every bad input of the op contract (docs/ops.md) against every backend runnable here.

The rules and messages live once, in ``pni_fast/contract.py`` (RULES); the Python backends call it
and the C++ kernels print its messages through the generated ``csrc/check_messages.h``. Here each
bad input goes to each backend — the C++ CPU kernels, the pure-PyTorch ops, the Triton ops (under
the interpreter on CPU), and the fake kernels of each (FakeTensorMode) — and must raise the rule's
exception with the rule's message; the only difference allowed is the op's name, which carries
the backend's suffix (``perturb_triton: rng_state must ...``). Boundary inputs that the contract
accepts must pass everywhere, so the conditions agree too, not only the words. The CUDA kernels
call the same ``csrc/checks.h`` functions as the CPU kernels (see that file), so they are covered
by construction. The inputs: tests/op_check_cases.py; the rules as written and the generated header:
tests/test_op_checks.py.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pni_fast  # noqa: F401  (registers the torch ops and their autograd)
from pni_fast import _ext
from pni_fast.contract import RULES, message

from op_check_cases import CASES, Case, defaults

HAS_CPP = _ext.load() and _ext.has_op("perturb", "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
for _name, _ok in (("cpu", HAS_CPP), ("triton", HAS_TRITON)):
    if _ok:  # the first call through a backend registers its ops' fake kernels and autograd
        pni_fast.randn(4, seed=1, backend=_name)

# The fake kernels of the C++ ops are registered by pni_fast.functional (_register_cpp_fakes) and run op_checks.
CPP_FAKES_CHECK = True


@dataclass(frozen=True)
class Backend:
    name: str
    suffix: str  # op name suffix: torch.ops.pni_fast.perturb<suffix>
    fake: bool  # call the fake kernel (FakeTensorMode) instead of the real one
    available: bool
    families: tuple = ("noise", "perturb", "multi")


BACKENDS = [
    Backend("cpp", "", False, HAS_CPP),
    Backend("cpp-fake", "", True, HAS_CPP),
    Backend("torch", "_torch", False, True, ("noise", "perturb")),  # the torch backend has no list ops
    Backend("torch-fake", "_torch", True, True, ("noise", "perturb")),
    Backend("triton", "_triton", False, HAS_TRITON),
    Backend("triton-fake", "_triton", True, HAS_TRITON),
]

OPS = {
    "noise": ("noise", "rng_words", "rng_uniform"),  # rng_words / rng_uniform: C++ only
    "perturb": ("perturb", "perturb_alpha_grad"),
    "multi": ("perturb_multi", "perturb_alpha_grad_multi"),
}


def _expected(case: Case, op: str, vname: str) -> tuple[type, str]:
    lists = vname + "s"
    prefix = case.prefix.format(op=op, list=lists)
    fields = dict(case.fields)
    if case.rule == "list_lengths":
        fields = dict(zip(("n_v", "n_alpha", "n_sigma", "n_offset", "n_inner"), fields.pop("counts")), lists=lists)
    fields.setdefault("vname", vname)
    wanted = [f for f in RULES[case.rule].fields]
    return RULES[case.rule].error, message(case.rule, prefix, **{k: fields[k] for k in wanted})


def _args(case: Case, op: str) -> list:
    a = {**defaults(case.family), **case.args}
    if case.family == "noise":
        return [a["like"], a["seed"], a["offset"], a["rng_state"]]
    if case.family == "perturb":
        return [a["v"], a["alpha"], a["sigma"], a["seed"], a["offset"], a["inner"], a["rng_state"]]
    return [a["vs"], a["alphas"], a["sigmas"], a["seeds"], a["offsets"], a["inners"], a["rng_state"]]


def _call(backend: Backend, op: str, args: list):
    overload = getattr(torch.ops.pni_fast, op).default
    if not backend.fake:
        # Straight to the CPU kernel, past autograd and past the Meta dispatch that a meta argument
        # (the device-mismatch cases) would otherwise select.
        return overload.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)
    with FakeTensorMode() as mode:

        def fake(x):
            if isinstance(x, torch.Tensor):
                return mode.from_tensor(x)
            if isinstance(x, list):
                return [fake(y) for y in x]
            return x

        return overload(*[fake(x) for x in args])


def _params():
    for backend in BACKENDS:
        for case in CASES:
            if case.family not in backend.families:
                continue
            ops = OPS[case.family] if backend.suffix == "" else OPS[case.family][: 2 if case.family != "noise" else 1]
            for op in ops:
                if case.data and backend.fake:
                    continue
                marks = [pytest.mark.skipif(not backend.available, reason=f"backend {backend.name} not available")]
                if backend.name == "cpp-fake" and case.rule and not CPP_FAKES_CHECK:
                    marks.append(
                        pytest.mark.xfail(
                            strict=True, reason="the C++ ops' fake kernels (functional.py) do not call op_checks yet"
                        )
                    )
                yield pytest.param(backend, case, op, id=f"{backend.name}-{op}-{case.name}", marks=marks)


@pytest.mark.parametrize("backend,case,op", list(_params()))
def test_bad_input_same_error_everywhere(backend, case, op):
    full = op + backend.suffix
    vname = "grad" if "alpha_grad" in op else "v"
    args = _args(case, full)
    if case.rule is None:
        _call(backend, full, args)  # the contract accepts it
        return
    error, expected = _expected(case, full, vname)
    with pytest.raises(Exception) as info:
        _call(backend, full, args)
    assert type(info.value) is error and str(info.value) == expected, (
        f"{full} on {backend.name}: got {type(info.value).__name__}: {info.value}\n"
        f"expected {error.__name__}: {expected}"
    )
