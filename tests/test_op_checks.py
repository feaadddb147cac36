"""Every bad input of the op contract (docs/ops.md) against every backend runnable here.

The rules and messages live once, in ``pni_fast/op_checks.py`` (RULES); the Python backends call it
and the C++ kernels print its messages through the generated ``csrc/check_messages.h``. Here each
bad input goes to each backend — the C++ CPU kernels, the pure-PyTorch ops, the Triton ops (under
the interpreter on CPU), and the fake kernels of each (FakeTensorMode) — and must raise the rule's
exception with the rule's message; the only difference allowed is the op's name, which carries
the backend's suffix (``perturb_triton: rng_state must ...``). Boundary inputs that the contract
accepts must pass everywhere, so the conditions agree too, not only the words. The CUDA kernels
call the same ``csrc/checks.h`` functions as the CPU kernels (see that file), so they are covered
by construction.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pni_fast  # noqa: F401  (registers the torch ops and their autograd)
from pni_fast import _ext
from pni_fast.op_checks import RULES, message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = 2**63

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


def _state(seed: int, base: int) -> torch.Tensor:
    return torch.tensor([seed, base], dtype=torch.int64)


@dataclass(frozen=True)
class Case:
    """One input (defaults changed by ``args``); ``rule`` None: the contract accepts it."""

    name: str
    family: str
    args: dict
    rule: Optional[str] = None
    fields: dict = field(default_factory=dict)
    prefix: str = ""  # "{op}: " and "{list}" are filled in per op
    data: bool = False  # needs tensor values (rng_state read on the host): not for fake kernels


def _defaults(family: str) -> dict:
    if family == "noise":
        return dict(like=torch.empty(24), seed=1, offset=0, rng_state=None)
    if family == "perturb":  # 24 elements = 6 counters; alpha [4] in runs of inner=6
        return dict(
            v=torch.randn(4, 6), alpha=torch.rand(4), sigma=torch.tensor(1.0), seed=1, offset=0, inner=6, rng_state=None
        )
    return dict(  # multi: 24 + 10 elements, offsets 0 and 6 (6 + 3 counters)
        vs=[torch.randn(4, 6), torch.randn(10)],
        alphas=[torch.rand(4), torch.tensor([0.5])],
        sigmas=[torch.tensor(1.0), torch.tensor(1.0)],
        seed=1,
        offsets=[0, 6],
        inners=[6, 1],
        rng_state=None,
    )


def _rng_state_cases(family: str) -> list[Case]:
    p = "{op}: "
    bad_base = {"noise": (L - 6, 0), "perturb": (L - 6, 0)}
    out = [
        Case(
            "state-int32",
            family,
            dict(rng_state=torch.zeros(2, dtype=torch.int32)),
            "rng_state_dtype",
            dict(dtype=torch.int32),
            p,
        ),
        Case(
            "state-shape3",
            family,
            dict(rng_state=torch.zeros(3, dtype=torch.int64)),
            "rng_state_shape",
            dict(shape=[3]),
            p,
        ),
        Case(
            "state-shape2x1",
            family,
            dict(rng_state=torch.zeros(2, 1, dtype=torch.int64)),
            "rng_state_shape",
            dict(shape=[2, 1]),
            p,
        ),
        Case(
            "state-strided",
            family,
            dict(rng_state=torch.zeros(4, dtype=torch.int64)[::2]),
            "rng_state_contiguous",
            {},
            p,
        ),
        Case(
            "state-meta",
            family,
            dict(rng_state=torch.zeros(2, dtype=torch.int64, device="meta")),
            "rng_state_device",
            dict(device="cpu", state_device="meta"),
            p,
        ),
        Case("state-seed", family, dict(rng_state=_state(-1, 0)), "rng_state_seed", dict(seed=-1), p, data=True),
        Case("state-base", family, dict(rng_state=_state(1, -5)), "rng_state_base", dict(base=-5), p, data=True),
        Case("state-ok", family, dict(rng_state=_state(L - 1, 0))),
    ]
    if family in bad_base:
        base, offset = bad_base[family]
        out += [
            Case(
                "state-offset",
                family,
                dict(rng_state=_state(1, L - 1), offset=1),
                "state_offset",
                dict(base=L - 1, offset=1),
                data=True,
            ),
            Case(
                "state-counter",
                family,
                dict(rng_state=_state(1, base), offset=offset),
                "state_counter_limit",
                dict(base=base, offset=offset, numel=24),
                data=True,
            ),
            Case("state-counter-ok", family, dict(rng_state=_state(1, base - 1), offset=offset)),
        ]
    else:  # multi: tensor 0 ends at counter base + 6, tensor 1 at base + 6 + 3
        out += [
            Case(
                "state-offset",
                family,
                dict(rng_state=_state(1, 4), offsets=[0, L - 4]),
                "state_offset",
                dict(base=4, offset=L - 4),
                "{list}[1]: ",
                data=True,
            ),
            Case(
                "state-counter",
                family,
                dict(rng_state=_state(1, L - 9)),
                "state_counter_limit",
                dict(base=L - 9, offset=6, numel=10),
                "{list}[1]: ",
                data=True,
            ),
            Case("state-counter-ok", family, dict(rng_state=_state(1, L - 10))),
        ]
    return out


_BAD_DTYPES = [
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    getattr(torch, "uint16", torch.int16),
    getattr(torch, "float8_e4m3fn", torch.int16),
]


def _perturb_cases() -> list[Case]:
    f = "perturb"
    v16 = torch.randn(4, 6).half()
    cases = [
        Case(f"v-{str(dt)[6:]}", f, dict(v=torch.zeros(4, 6, dtype=dt)), "dtype", dict(dtype=dt))
        for dt in dict.fromkeys(_BAD_DTYPES)
    ]
    cases += [
        Case(
            "alpha-f64",
            f,
            dict(alpha=torch.rand(4, dtype=torch.float64)),
            "alpha_dtype",
            dict(dtype=torch.float32, or_float32="", alpha_dtype=torch.float64),
        ),
        Case(
            "alpha-f64-half-v",
            f,
            dict(v=v16, alpha=torch.rand(4, dtype=torch.float64)),
            "alpha_dtype",
            dict(dtype=torch.float16, or_float32=" or torch.float32", alpha_dtype=torch.float64),
        ),
        Case(
            "alpha-bf16-half-v",
            f,
            dict(v=v16, alpha=torch.rand(4, dtype=torch.bfloat16)),
            "alpha_dtype",
            dict(dtype=torch.float16, or_float32=" or torch.float32", alpha_dtype=torch.bfloat16),
        ),
        Case(
            "alpha-meta",
            f,
            dict(alpha=torch.rand(4, device="meta")),
            "alpha_device",
            dict(device="cpu", alpha_device="meta"),
        ),
        Case("alpha-empty", f, dict(alpha=torch.empty(0)), "alpha_empty", dict(alpha_shape=[0])),
        Case("sigma-1d", f, dict(sigma=torch.ones(1)), "sigma_shape", dict(sigma_shape=[1])),
        Case(
            "sigma-f64",
            f,
            dict(sigma=torch.tensor(1.0, dtype=torch.float64)),
            "sigma_dtype",
            dict(dtype=torch.float32, sigma_dtype=torch.float64),
        ),
        Case(
            "sigma-f16-bf16-v",
            f,
            dict(v=torch.randn(4, 6).bfloat16(), sigma=torch.tensor(1.0).half()),
            "sigma_dtype",
            dict(dtype=torch.bfloat16, sigma_dtype=torch.float16),
        ),
        Case(
            "sigma-meta",
            f,
            dict(sigma=torch.tensor(1.0, device="meta")),
            "sigma_device",
            dict(device="cpu", sigma_device="meta"),
        ),
        Case("seed-neg", f, dict(seed=-1), "seed", dict(seed=-1)),
        Case("offset-neg", f, dict(offset=-5), "offset", dict(offset=-5)),
        Case("counter-limit", f, dict(offset=L - 6), "counter_limit", dict(offset=L - 6, numel=24)),
        Case("inner-0", f, dict(inner=0), "inner", dict(inner=0)),
        Case("inner-neg", f, dict(inner=-1), "inner", dict(inner=-1)),
        Case(
            "tiling-inner",
            f,
            dict(inner=5),
            "alpha_tiling",
            dict(alpha_numel=4, alpha_shape=[4], shape=[4, 6], inner=5, numel=24, tile=20),
        ),
        Case(
            "tiling-alpha",
            f,
            dict(alpha=torch.rand(5, 1), inner=1),
            "alpha_tiling",
            dict(alpha_numel=5, alpha_shape=[5, 1], shape=[4, 6], inner=1, numel=24, tile=5),
        ),
        # accepted: the boundaries of each rule
        Case("ok-counter", f, dict(offset=L - 7)),
        Case("ok-seed-max", f, dict(seed=L - 1)),
        Case("ok-half-f32-alpha", f, dict(v=v16, alpha=torch.rand(4))),
        Case("ok-f64-f32-sigma", f, dict(v=torch.randn(4, 6).double(), alpha=torch.rand(4).double())),
        Case("ok-empty-any-alpha", f, dict(v=torch.empty(0, 6), alpha=torch.empty(0), inner=0)),
        Case("ok-empty-inner0", f, dict(v=torch.empty(0, 6), alpha=torch.rand(5), inner=0)),
        Case("ok-elementwise", f, dict(alpha=torch.rand(4, 6), inner=1)),
    ]
    return cases + _rng_state_cases(f)


def _noise_cases() -> list[Case]:
    f = "noise"
    return [
        Case("seed-neg", f, dict(seed=-3), "seed", dict(seed=-3)),
        Case("offset-neg", f, dict(offset=-1), "offset", dict(offset=-1)),
        Case("counter-limit", f, dict(offset=L - 6), "counter_limit", dict(offset=L - 6, numel=24)),
        Case("ok-counter", f, dict(offset=L - 7)),
        Case("ok-empty", f, dict(like=torch.empty(0), offset=L - 1)),
    ] + _rng_state_cases(f)


def _multi_cases() -> list[Case]:
    f = "multi"
    p, p0, p1 = "{op}: ", "{list}[0]: ", "{list}[1]: "
    a, s = torch.rand(4), torch.tensor(1.0)
    return [
        Case("lengths-alphas", f, dict(alphas=[a]), "list_lengths", dict(counts=(2, 1, 2, 2, 2)), p),
        Case("lengths-sigmas", f, dict(sigmas=[s, s, s]), "list_lengths", dict(counts=(2, 2, 3, 2, 2)), p),
        Case("lengths-offsets", f, dict(offsets=[0]), "list_lengths", dict(counts=(2, 2, 2, 1, 2)), p),
        Case("lengths-inners", f, dict(inners=[]), "list_lengths", dict(counts=(2, 2, 2, 2, 0)), p),
        Case(
            "alpha1-f64",
            f,
            dict(alphas=[a, torch.tensor([0.5], dtype=torch.float64)]),
            "alpha_dtype",
            dict(dtype=torch.float32, or_float32="", alpha_dtype=torch.float64),
            p1,
        ),
        Case(
            "v1-int",
            f,
            dict(vs=[torch.randn(4, 6), torch.ones(10, dtype=torch.int32)]),
            "dtype",
            dict(dtype=torch.int32),
            p1,
        ),
        Case("sigma0-2d", f, dict(sigmas=[torch.ones(1, 1), s]), "sigma_shape", dict(sigma_shape=[1, 1]), p0),
        Case("seed-neg", f, dict(seed=-2), "seed", dict(seed=-2), p0),
        Case("offset1-neg", f, dict(offsets=[0, -1]), "offset", dict(offset=-1), p1),
        Case("counter1-limit", f, dict(offsets=[0, L - 3]), "counter_limit", dict(offset=L - 3, numel=10), p1),
        Case("inner0-0", f, dict(inners=[0, 1]), "inner", dict(inner=0), p0),
        Case(
            "tiling0",
            f,
            dict(inners=[5, 1]),
            "alpha_tiling",
            dict(alpha_numel=4, alpha_shape=[4], shape=[4, 6], inner=5, numel=24, tile=20),
            p0,
        ),
        Case("alpha1-empty", f, dict(alphas=[a, torch.empty(0)]), "alpha_empty", dict(alpha_shape=[0]), p1),
        Case("ok-counter", f, dict(offsets=[0, L - 4])),
        Case("ok-empty-lists", f, dict(vs=[], alphas=[], sigmas=[], offsets=[], inners=[])),
        Case(
            "ok-zero-size",
            f,
            dict(vs=[torch.empty(0, 3), torch.randn(10)], alphas=[torch.empty(0), a[:1]], inners=[0, 1]),
        ),
    ] + _rng_state_cases(f)


CASES = _noise_cases() + _perturb_cases() + _multi_cases()


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
    a = {**_defaults(case.family), **case.args}
    if case.family == "noise":
        return [a["like"], a["seed"], a["offset"], a["rng_state"]]
    if case.family == "perturb":
        return [a["v"], a["alpha"], a["sigma"], a["seed"], a["offset"], a["inner"], a["rng_state"]]
    return [a["vs"], a["alphas"], a["sigmas"], a["seed"], a["offsets"], a["inners"], a["rng_state"]]


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


def test_every_rule_has_a_case():
    """A new rule without a bad input here would go untested on the backends."""
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
