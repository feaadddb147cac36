"""Argument checks of the Triton ops: the op contract's rules (:mod:`pni_fast.contract`, one
definition for every backend) plus what only this backend needs: CUDA tensors (or CPU under the
interpreter) and one device per list launch.

Every check also works while ``torch.compile`` traces the ops: a condition on a SymInt (a drawn
seed, a dynamic size) becomes a runtime assertion instead of a guard (``contract.require``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ... import contract

__all__: list[str] = []  # private module: used by the ops of this package


def check_device(op: str, name: str, t: torch.Tensor, interpreted: bool) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreted:
        return
    hint = " (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)" if t.device.type == "cpu" else ""
    raise ValueError(f"{op}: {name} must be a CUDA tensor for the Triton backend, got device {t.device}{hint}")


def check_noise(
    op: str, like: torch.Tensor, seed, offset, rng_state: Optional[torch.Tensor], interpreted: bool
) -> None:
    check_device(op, "like", like, interpreted)
    contract.check_noise(op, like, seed, offset, rng_state)


def check_single(
    op: str,
    vname: str,
    v: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    seed,
    offset,
    inner,
    rng_state: Optional[torch.Tensor],
    interpreted: bool,
) -> None:
    """perturb (``vname`` "v") / perturb_alpha_grad ("grad")."""
    check_device(op, vname, v, interpreted)
    contract.check_perturb(op, vname, v, alpha, sigma, seed, offset, inner, rng_state)


def check_multi(
    op: str,
    vname: str,
    vs: Sequence[torch.Tensor],
    alphas: Sequence[torch.Tensor],
    sigmas: Sequence[torch.Tensor],
    seeds: Sequence,
    offsets: Sequence,
    inners: Sequence,
    rng_state: Optional[torch.Tensor],
    interpreted: bool,
) -> None:
    """The list ops: the contract's checks, then one device for the whole launch."""
    contract.check_perturb_multi(op, vname, vs, alphas, sigmas, seeds, offsets, inners, rng_state)
    for i, v in enumerate(vs):
        check_device(op, f"{vname}s[{i}]", v, interpreted)
    if vs and any(v.device != vs[0].device for v in vs):
        raise ValueError(f"{op}: all {vname}s must be on one device, got {sorted({str(v.device) for v in vs})}")
