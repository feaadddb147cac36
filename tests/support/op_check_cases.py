"""The inputs of the op contract (docs/ops.md) that tests/backends/test_contract_per_backend.py sends to every backend.

Each ``Case`` is one call with some arguments changed from a valid default: a bad input names the
rule of ``pni_fast/contract.py`` (RULES) it breaks and the fields of that rule's message; a case
without a rule is a boundary input the contract accepts. Kept apart from the test so the table of
inputs reads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

L = 2**63


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


def defaults(family: str) -> dict:
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
        seeds=[1],
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
        Case("seed-neg", f, dict(seeds=[-2]), "seed", dict(seed=-2), p0),
        Case("seed1-neg", f, dict(seeds=[1, -3]), "seed", dict(seed=-3), p1),
        Case("seeds-3", f, dict(seeds=[1, 2, 3]), "seeds_length", dict(n_v=2, n_seeds=3), p),
        Case("seeds-empty", f, dict(seeds=[]), "seeds_length", dict(n_v=2, n_seeds=0), p),
        Case("seeds-with-state", f, dict(seeds=[1, 2], rng_state=_state(1, 0)), "seeds_rng_state", dict(n_seeds=2), p),
        Case("ok-seeds-per-tensor", f, dict(seeds=[0, L - 1])),
        Case("ok-empty-lists-no-seed", f, dict(vs=[], alphas=[], sigmas=[], seeds=[], offsets=[], inners=[])),
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
