"""Argument checks of the Triton ops: the rules of docs/ops.md (contract v2), as in csrc/checks.h.

Errors are ``ValueError`` / ``TypeError`` naming the argument. Every check also works while
``torch.compile`` traces the ops: a drawn seed (``.item()``) or a dynamic size arrives as a
SymInt, and ``bool()`` of a condition on it would guard on a data-dependent value, so such
conditions go to ``torch._check`` (a runtime assertion) instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

__all__: list[str] = []  # private module: used by pni_fast.triton.ops

SEED_LIMIT = 2**63
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (or a functional wrapper of one): it has shapes but no data."""
    return torch._subclasses.fake_tensor.is_fake(t)


def require(ok, op: str, message) -> None:
    """Raise ``ValueError(f"{op}: {message()}")`` unless ``ok`` (a bool, or a SymBool under tracing)."""
    if isinstance(ok, bool):
        if not ok:
            raise ValueError(f"{op}: {message()}")
    else:
        torch._check(ok, lambda: f"{op}: {message()}")


def check_device(op: str, name: str, t: torch.Tensor, interpreted: bool) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreted:
        return
    hint = " (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)" if t.device.type == "cpu" else ""
    raise ValueError(f"{op}: {name} must be a CUDA tensor for the Triton backend, got device {t.device}{hint}")


def check_seed(op: str, seed) -> None:
    require(seed >= 0, op, lambda: f"seed must be in [0, 2**63), got {seed}")
    require(seed < SEED_LIMIT, op, lambda: f"seed must be in [0, 2**63), got {seed}")


def check_offset(op: str, offset, numel) -> None:
    """offset >= 0 and offset + ceil(numel / 4) < 2**63 (the last counter stays below 2**63)."""
    require(offset >= 0, op, lambda: f"offset must be >= 0, got {offset}")
    require(offset + (numel + 3) // 4 < SEED_LIMIT, op,
            lambda: f"offset + ceil(numel / 4) must be < 2**63, got offset={offset}, numel={numel}")


def check_rng_state(op: str, rng_state: Optional[torch.Tensor], device: torch.device,
                    offsets: Sequence, numels: Sequence) -> None:
    """rng_state: None, or int64 [2] (seed, counter base), contiguous, on ``device``.

    On CPU (the interpreter) the values are read on the host and get the seed/offset checks with
    counter offset ``base + offset``. On CUDA they stay on the device (no host sync), so they are
    not range-checked: the kernels use them as the bits of a uint64 seed and counter.
    """
    if rng_state is None:
        return
    if not isinstance(rng_state, torch.Tensor):
        raise TypeError(f"{op}: rng_state must be a torch.Tensor or None, got {type(rng_state).__name__}")
    if rng_state.dtype != torch.int64:
        raise TypeError(f"{op}: rng_state must be an int64 tensor (seed, counter base), got {rng_state.dtype}")
    if tuple(rng_state.shape) != (2,):
        raise ValueError(f"{op}: rng_state must have shape [2] (seed, counter base), got {list(rng_state.shape)}")
    if not rng_state.is_contiguous():
        raise ValueError(f"{op}: rng_state must be contiguous")
    if rng_state.device != device:
        raise ValueError(f"{op}: rng_state must be on the op's device {device}, got {rng_state.device}")
    if rng_state.device.type == "cpu" and not is_fake(rng_state):
        seed, base = (int(x) for x in rng_state.tolist())
        check_seed(op, seed)
        require(base >= 0, op, lambda: f"rng_state[1] (counter base) must be >= 0, got {base}")
        for offset, numel in zip(offsets, numels):
            if isinstance(offset, int):
                check_offset(op, base + offset, numel)


def check_perturb(op: str, vname: str, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                  inner, interpreted: bool) -> None:
    """Tensor checks shared by perturb and perturb_alpha_grad (``v`` is the value or the gradient)."""
    for name, t in ((vname, v), ("alpha", alpha), ("sigma", sigma)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {vname} must be float32, float16, bfloat16 or float64, got {v.dtype}")
    if alpha.dtype != v.dtype and not (v.dtype in HALF_DTYPES and alpha.dtype == torch.float32):
        extra = " or float32" if v.dtype in HALF_DTYPES else ""
        raise TypeError(f"{op}: alpha must have {vname}'s dtype {v.dtype}{extra}, got {alpha.dtype}")
    if sigma.dtype not in (torch.float32, v.dtype):
        raise TypeError(f"{op}: sigma must be float32 or {vname}'s dtype {v.dtype}, got {sigma.dtype}")
    if sigma.dim() != 0:
        raise ValueError(f"{op}: sigma must be a 0-d tensor, got shape {tuple(sigma.shape)}")
    check_device(op, vname, v, interpreted)
    for name, t in (("alpha", alpha), ("sigma", sigma)):
        if t.device != v.device:
            raise ValueError(f"{op}: {name} must be on {vname}'s device {v.device}, got {t.device}")
    n, n_alpha = v.numel(), alpha.numel()
    if n_alpha == 0:
        raise ValueError(f"{op}: alpha must have at least one element")
    if n == 0:  # a zero-size tensor fits any alpha; the layer passes inner == 0 for e.g. a [4, 0] weight
        require(inner >= 0, op, lambda: f"inner must be >= 1 (0 only for a zero-size {vname}), got {inner}")
        return
    require(inner >= 1, op, lambda: f"inner must be >= 1 (0 only for a zero-size {vname}), got {inner}")
    if n_alpha > 1:
        require(n % (n_alpha * inner) == 0, op, lambda: (
            f"alpha with {n_alpha} elements and inner={inner} must tile {vname} "
            f"({n} elements): expected numel % (alpha.numel() * inner) == 0"))


def check_lists(op: str, vname: str, vs: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor],
                sigmas: Sequence[torch.Tensor], offsets: Sequence[int], inners: Sequence[int]) -> None:
    lengths = {len(vs), len(alphas), len(sigmas), len(offsets), len(inners)}
    if len(lengths) != 1:
        raise ValueError(
            f"{op}: {vname}s, alphas, sigmas, offsets and inners must have the same length, got "
            f"{len(vs)}, {len(alphas)}, {len(sigmas)}, {len(offsets)}, {len(inners)}"
        )
    if vs and any(v.device != vs[0].device for v in vs):
        raise ValueError(f"{op}: all {vname}s must be on one device, got {sorted({str(v.device) for v in vs})}")
