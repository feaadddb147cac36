"""The op contract (docs/ops.md) in Python: every rule, its exception and its message, and the
constants every layer shares (dtypes, the seed/counter limit, alpha's layout), each defined once.

:data:`RULES` is the single definition of the checks. The Python backends (pure PyTorch, Triton),
the C++ ops' fake kernels and the public functions call the ``check_*`` functions below; the C++
kernels (CPU, CUDA, Meta) use the same messages through ``csrc/check_messages.h``, generated from
:data:`RULES` by ``scripts/gen_check_messages.py`` (a test fails when that file is stale, and
another runs every bad input against every backend comparing exception type and message).

This module is the bottom of the package: it imports nothing of pni_fast.

Messages carry a ``prefix``: ``""`` for a single op, ``"vs[2]: "`` for one tensor of a list op, or
``"<op>: "`` for the checks that concern the whole call (lists, ``rng_state``). Values print as in
Python: dtypes ``torch.float32``, shapes ``[2, 3]``, devices ``cpu``.

A condition on a SymInt (a drawn seed, a dynamic size under ``torch.compile``) goes to
``torch._check_with``, a runtime assertion, instead of guarding on its value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
from torch import Tensor

__all__ = [
    "SEED_LIMIT",
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "quads",
    "is_fake",
    "opmath",
    "alpha_dtype_ok",
    "alpha_view",
    "check_tensor",
    "check_alpha_dtype",
    "Rule",
    "RULES",
    "message",
    "require",
    "fail",
    "check_seed_offset",
    "check_offset_fits",
    "check_rng_state",
    "check_state_counter",
    "check_perturb_args",
    "check_multi_lengths",
    "check_multi_seeds",
    "list_prefix",
    "check_noise",
    "check_perturb",
    "check_perturb_multi",
]

SEED_LIMIT = 2**63  # seeds and Philox counters are int64 on every backend: both stay below 2^63
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def quads(n):
    """Philox counters (4 values each) that n elements consume."""
    return (n + 3) // 4


def is_fake(t: Tensor) -> bool:
    """A FakeTensor (or a functional wrapper of one): it has shapes but no data."""
    return torch._subclasses.fake_tensor.is_fake(t)


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_dtype_ok(alpha_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """alpha has the tensor's dtype, or float32 with a float16/bfloat16 tensor (AMP keeps parameters
    float32; the alpha gradient is then reduced and returned in float32, where half would overflow)."""
    return alpha_dtype == dtype or (dtype in HALF_DTYPES and alpha_dtype == torch.float32)


def alpha_view(alpha: Tensor, numel: int, inner: int) -> tuple[tuple[int, int, int], Tensor]:
    """Shapes that broadcast alpha by the contract's rule ``alpha[(i // inner) % n_alpha]``.

    Returns the ``(outer, n_alpha, inner)`` view for the flattened tensor and alpha viewed
    as ``(1, n_alpha, 1)``; a layerwise alpha becomes ``(1, 1, 1)``.
    """
    n_alpha = alpha.numel()
    if n_alpha == 1 or numel == 0:  # a zero-size tensor takes no alpha value
        return (numel, 1, 1), alpha.reshape(-1)[:1].reshape(1, 1, 1)
    block = n_alpha * inner
    if inner < 1 or numel % block != 0:
        raise ValueError(f"alpha with {n_alpha} elements and inner={inner} does not tile a tensor of {numel} elements")
    return (numel // block, n_alpha, inner), alpha.reshape(1, n_alpha, 1)


@dataclass(frozen=True)
class Rule:
    """One check: ``error`` raised with ``prefix + template.format(**fields)``. ``scope``: ``"op"`` for the
    ops' own arguments (every backend checks them), ``"public"`` for the public functions' checks that
    the eager fast path (``pni_fast::noisy``, C++) makes too."""

    name: str
    error: type
    template: str
    scope: str = "op"

    @property
    def fields(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.template)


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        # v / grad (vname) and its companions
        Rule("dtype", TypeError, "{vname} must be float32, float64, float16 or bfloat16, got {dtype}"),
        Rule(
            "alpha_dtype",
            TypeError,
            "alpha must have dtype {dtype} (the dtype of {vname}){or_float32}, got {alpha_dtype}",
        ),
        Rule("alpha_device", ValueError, "alpha must be on {vname}'s device ({device}), got {alpha_device}"),
        Rule(
            "alpha_empty",
            ValueError,
            "alpha must have at least one element (unless {vname} is zero-size), got shape {alpha_shape}",
        ),
        Rule("sigma_shape", ValueError, "sigma must be a 0-d tensor, got shape {sigma_shape}"),
        Rule("sigma_dtype", TypeError, "sigma must be float32 or {vname}'s dtype ({dtype}), got {sigma_dtype}"),
        Rule("sigma_device", ValueError, "sigma must be on {vname}'s device ({device}), got {sigma_device}"),
        # seed and Philox counters
        Rule("seed", ValueError, "seed must be in [0, 2^63), got {seed}"),
        Rule("offset", ValueError, "offset must be >= 0 (a Philox counter offset), got {offset}"),
        Rule(
            "counter_limit", ValueError, "offset + ceil(numel / 4) must be < 2^63, got offset={offset}, numel={numel}"
        ),
        # alpha's layout
        Rule("inner", ValueError, "inner must be >= 1 (0 only for a zero-size {vname}), got {inner}"),
        Rule(
            "alpha_tiling",
            ValueError,
            "alpha with {alpha_numel} elements (shape {alpha_shape}) does not fit {vname} of shape {shape} with "
            "inner={inner}: expected numel ({numel}) to be a multiple of inner * alpha.numel() ({tile})",
        ),
        # list ops
        Rule(
            "list_lengths",
            ValueError,
            "{lists}, alphas, sigmas, offsets and inners must have the same length, got {n_v}, {n_alpha}, {n_sigma}, "
            "{n_offset}, {n_inner}",
        ),
        Rule("seeds_length", ValueError, "seeds must hold 1 seed or one per tensor ({n_v}), got {n_seeds}"),
        Rule(
            "seeds_rng_state",
            ValueError,
            "seeds must hold 1 seed when rng_state is given (rng_state[0] is every tensor's key), got {n_seeds}",
        ),
        # the public functions' own arguments (pni_fast.functional)
        Rule("tensor_type", TypeError, "{name} must be a torch.Tensor, got {type}", "public"),
        Rule("int_type", TypeError, "{name} must be an int, got {type}", "public"),
        # the public functions' finite checks on CPU (pni_fast.functional._check_finite and the fast
        # path's C++ twin in csrc/cpu/noisy_cpu.cpp)
        Rule(
            "tensor_finite",
            ValueError,
            "{name} contains NaN or Inf, so its std (PNI's noise scale) is not finite; fix the tensor before "
            "injecting noise",
            "public",
        ),
        Rule("alpha_finite", ValueError, "alpha must be finite (PNI's noise scale), got NaN or Inf", "public"),
        # rng_state: the tensor, then (CPU only: read on the host) its values
        Rule("rng_state_dtype", TypeError, "rng_state must be an int64 tensor (seed, counter base), got {dtype}"),
        Rule("rng_state_shape", ValueError, "rng_state must have shape [2] (seed, counter base), got {shape}"),
        Rule("rng_state_contiguous", ValueError, "rng_state must be contiguous"),
        Rule("rng_state_device", ValueError, "rng_state must be on the op's device ({device}), got {state_device}"),
        Rule("rng_state_seed", ValueError, "rng_state[0] (the seed) must be in [0, 2^63), got {seed}"),
        Rule("rng_state_base", ValueError, "rng_state[1] (the counter base) must be >= 0, got {base}"),
        Rule(
            "state_offset", ValueError, "rng_state[1] + offset must be < 2^63, got rng_state[1]={base}, offset={offset}"
        ),
        Rule(
            "state_counter_limit",
            ValueError,
            "rng_state[1] + offset + ceil(numel / 4) must be < 2^63, got rng_state[1]={base}, offset={offset}, "
            "numel={numel}",
        ),
    )
}


def message(rule: str, prefix: str = "", **fields) -> str:
    """The full message of ``rule`` (what every backend raises); shapes print as lists."""
    fields = {k: list(v) if isinstance(v, torch.Size) else v for k, v in fields.items()}
    return prefix + RULES[rule].template.format(**fields)


def fail(rule: str, prefix: str = "", **fields) -> NoReturn:
    """Raise ``RULES[rule].error`` with the rule's message."""
    raise RULES[rule].error(message(rule, prefix, **fields))


def require(ok, rule: str, prefix: str = "", **fields) -> None:
    """Raise ``RULES[rule].error`` unless ``ok`` (a bool, or a SymBool: then a runtime assertion)."""
    if ok is True:
        return
    if ok is False:
        fail(rule, prefix, **fields)
    torch._check_with(RULES[rule].error, ok, lambda: message(rule, prefix, **fields))


# ---------------------------------------------------------------------------
# The rules (the same functions, in the same order, as csrc/checks.h)
# ---------------------------------------------------------------------------


def check_seed_offset(seed, offset, prefix: str = "") -> None:
    require(seed >= 0, "seed", prefix, seed=seed)
    require(seed < SEED_LIMIT, "seed", prefix, seed=seed)  # C++: int64 already (the schema refuses larger)
    require(offset >= 0, "offset", prefix, offset=offset)


def check_offset_fits(offset, numel, prefix: str = "") -> None:
    """The last counter, offset + ceil(numel / 4) - 1, stays below 2^63 - 1 (counters are int64)."""
    require(offset + quads(numel) < SEED_LIMIT, "counter_limit", prefix, offset=offset, numel=numel)


def check_rng_state(op: str, rng_state: Optional[Tensor], device: torch.device) -> Optional[int]:
    """rng_state: None, or int64 [2] (seed, counter base), contiguous, on the op's ``device``.

    Returns the counter base when the values are read on the host (a real CPU tensor; then
    they are range-checked), else None: on CUDA they stay on the device (no host sync) and
    are the bits of a uint64 seed and counter, and a fake tensor has no values.
    """
    if rng_state is None:
        return None
    p = f"{op}: "
    s = rng_state
    require(s.dtype == torch.int64, "rng_state_dtype", p, dtype=s.dtype)
    require(s.dim() == 1 and s.shape[0] == 2, "rng_state_shape", p, shape=s.shape)
    require(s.is_contiguous(), "rng_state_contiguous", p)
    require(s.device == torch.device(device), "rng_state_device", p, device=device, state_device=s.device)
    if s.device.type != "cpu" or is_fake(s):
        return None
    seed, base = (int(x) for x in s.tolist())
    require(seed >= 0, "rng_state_seed", p, seed=seed)
    require(base >= 0, "rng_state_base", p, base=base)
    return base


def check_state_counter(base: int, offset, numel, prefix: str = "") -> None:
    """With rng_state read on the host: base + offset + ceil(numel / 4) < 2^63."""
    require(offset < SEED_LIMIT - base, "state_offset", prefix, base=base, offset=offset)
    require(
        base + offset + quads(numel) < SEED_LIMIT, "state_counter_limit", prefix, base=base, offset=offset, numel=numel
    )


def check_perturb_args(
    v: Tensor, alpha: Tensor, sigma: Tensor, seed, offset, inner, vname: str, prefix: str = ""
) -> None:
    """perturb / perturb_alpha_grad (``vname`` "v" or "grad"): dtypes, devices, seed, offset, alpha's layout."""
    vt, st = v.dtype, sigma.dtype
    device, alpha_device, sigma_device = v.device, alpha.device, sigma.device
    n, na = v.numel(), alpha.numel()
    require(vt in FLOAT_DTYPES, "dtype", prefix, vname=vname, dtype=vt)
    check_alpha_dtype(alpha, vt, vname, prefix)
    require(alpha_device == device, "alpha_device", prefix, vname=vname, device=device, alpha_device=alpha_device)
    require(na >= 1 or n == 0, "alpha_empty", prefix, vname=vname, alpha_shape=alpha.shape)
    require(sigma.dim() == 0, "sigma_shape", prefix, sigma_shape=sigma.shape)
    require(st == torch.float32 or st == vt, "sigma_dtype", prefix, vname=vname, dtype=vt, sigma_dtype=st)
    require(sigma_device == device, "sigma_device", prefix, vname=vname, device=device, sigma_device=sigma_device)
    check_seed_offset(seed, offset, prefix)
    check_offset_fits(offset, n, prefix)
    require(inner >= 1 or (inner == 0 and n == 0), "inner", prefix, vname=vname, inner=inner)
    if na > 1 and n > 0:  # element i uses alpha_flat[(i // inner) % na]: whole repetitions of na runs of inner
        require(
            n % (inner * na) == 0,
            "alpha_tiling",
            prefix,
            alpha_numel=na,
            alpha_shape=alpha.shape,
            vname=vname,
            shape=v.shape,
            inner=inner,
            numel=n,
            tile=inner * na,
        )


def check_tensor(name: str, t) -> None:
    """A public function's tensor argument: a tensor of a floating dtype the ops take."""
    if not isinstance(t, Tensor):
        fail("tensor_type", name=name, type=type(t).__name__)
    require(t.dtype in FLOAT_DTYPES, "dtype", vname=name, dtype=t.dtype)


def check_alpha_dtype(alpha: Tensor, dtype: torch.dtype, vname: str, prefix: str = "") -> None:
    """The ``alpha_dtype`` rule: alpha has the dtype of ``vname`` ("v", "weight", "x", ...), or float32
    with a float16/bfloat16 tensor."""
    require(
        alpha_dtype_ok(alpha.dtype, dtype),
        "alpha_dtype",
        prefix,
        dtype=dtype,
        vname=vname,
        or_float32=" or torch.float32" if dtype in HALF_DTYPES else "",
        alpha_dtype=alpha.dtype,
    )


def check_multi_lengths(op: str, lists: str, nv: int, na: int, ns: int, no: int, ni: int) -> None:
    require(
        na == nv and ns == nv and no == nv and ni == nv,
        "list_lengths",
        f"{op}: ",
        lists=lists,
        n_v=nv,
        n_alpha=na,
        n_sigma=ns,
        n_offset=no,
        n_inner=ni,
    )


def check_multi_seeds(op: str, nv: int, n_seeds: int, has_state: bool) -> None:
    """A list op's seeds: one shared by every tensor, or one per tensor; exactly one with rng_state."""
    require(n_seeds == 1 or n_seeds == nv, "seeds_length", f"{op}: ", n_v=nv, n_seeds=n_seeds)
    require(not has_state or n_seeds == 1, "seeds_rng_state", f"{op}: ", n_seeds=n_seeds)


def list_prefix(lists: str, i: int) -> str:
    return f"{lists}[{i}]: "


# ---------------------------------------------------------------------------
# Whole ops: what a Python kernel or fake kernel calls first
# ---------------------------------------------------------------------------


def check_noise(op: str, like: Tensor, seed, offset, rng_state: Optional[Tensor]) -> None:
    """noise / rng_words / rng_uniform."""
    check_seed_offset(seed, offset)
    check_offset_fits(offset, like.numel())
    base = check_rng_state(op, rng_state, like.device)
    if base is not None:
        check_state_counter(base, offset, like.numel())


def check_perturb(
    op: str, vname: str, v: Tensor, alpha: Tensor, sigma: Tensor, seed, offset, inner, rng_state: Optional[Tensor]
) -> None:
    """perturb (``vname`` "v") / perturb_alpha_grad ("grad")."""
    check_perturb_args(v, alpha, sigma, seed, offset, inner, vname)
    base = check_rng_state(op, rng_state, v.device)
    if base is not None:
        check_state_counter(base, offset, v.numel())


def check_perturb_multi(
    op: str,
    vname: str,
    vs: Sequence[Tensor],
    alphas: Sequence[Tensor],
    sigmas: Sequence[Tensor],
    seeds: Sequence,
    offsets: Sequence,
    inners: Sequence,
    rng_state: Optional[Tensor],
) -> None:
    """perturb_multi (``vname`` "v": lists ``vs``) / perturb_alpha_grad_multi ("grad": ``grads``).

    ``seeds``: one seed for every tensor, or seeds[i] for tensor i (checked with tensor i's prefix)."""
    lists = vname + "s"
    check_multi_lengths(op, lists, len(vs), len(alphas), len(sigmas), len(offsets), len(inners))
    check_multi_seeds(op, len(vs), len(seeds), rng_state is not None)
    device = vs[0].device if len(vs) else (rng_state.device if rng_state is not None else torch.device("cpu"))
    base = check_rng_state(op, rng_state, device)
    for i in range(len(vs)):
        p = list_prefix(lists, i)
        seed = seeds[0] if len(seeds) == 1 else seeds[i]
        check_perturb_args(vs[i], alphas[i], sigmas[i], seed, offsets[i], inners[i], vname, p)
        if base is not None:
            check_state_counter(base, offsets[i], vs[i].numel(), p)
