"""List ops of the Triton backend: ``perturb_multi_triton`` and ``perturb_alpha_grad_multi_triton``.

They pass their tensors to one launch through a packed int64 table of raw pointers
(list_kernels.py finds each program's row); pointers the compiler cannot see must not be traced
into a graph, so both are opaque ``torch.library.custom_op``s with fake kernels (still
``fullgraph``-compatible).

* Tensors are grouped by (dtype, alpha dtype, sigma dtype): one forward launch and two
  alpha-gradient launches per group. Each tensor's row carries its Philox key (``seeds[i]``, or the
  one shared seed; with ``rng_state`` the kernel reads the state's seed). Forward results are
  bit-identical to the single op; alpha gradients use one segmented-scan reduction for every
  tensor, so they agree with the single op to fp32 rounding.
* The pointer table is copied from pinned memory (non-blocking, no host sync); that copy cannot be
  replayed by a CUDA graph, so these ops refuse stream capture with a clear error - capture the
  single ops or the CUDA backend's list op (kernel parameters only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from .checks import check_multi
from .launch_config import (
    BLOCK,
    INTERPRETED,
    NUM_WARPS,
    PRECISE,
    grad_plan,
    index64,
    launch_guard,
    reduce_tiles,
    state_args,
)
from .list_kernels import alpha_grad_multi_reduce_kernel, perturb_multi_bwd_kernel, perturb_multi_fwd_kernel

__all__ = ["perturb_multi_triton", "perturb_alpha_grad_multi_triton"]

# Triton element types of the tensors' dtypes (the kernels cast the table's raw pointers).
_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def _device_table(rows: list[list[int]], tail: list[int], device: torch.device, op: str) -> torch.Tensor:
    """The packed int64 table (rows, then ``tail``) on ``device``, copied without a host sync."""
    flat = [x for row in rows for x in row] + tail
    host = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{op} cannot be captured in a CUDA graph: its pointer table is copied from host memory "
                "at launch; capture the single-tensor Triton ops or use backend='cuda'"
            )
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _seed_of(seeds: Sequence[int], i: int) -> int:
    """Tensor i's Philox key: ``seeds[i]``, or the one seed every tensor shares (checked lengths)."""
    return int(seeds[0] if len(seeds) == 1 else seeds[i])


def _groups(
    tensors: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor], sigmas: Sequence[torch.Tensor]
) -> dict[tuple, list[int]]:
    """Indices of the non-empty tensors, grouped by dtypes: one launch per group."""
    groups: dict[tuple, list[int]] = {}
    for i, (t, a, s) in enumerate(zip(tensors, alphas, sigmas)):
        if t.numel() > 0:
            groups.setdefault((t.dtype, a.dtype, s.dtype), []).append(i)
    return groups


@custom_op("pni_fast::perturb_multi_triton", mutates_args=())
def perturb_multi_triton(
    vs: list[torch.Tensor],
    alphas: list[torch.Tensor],
    sigmas: list[torch.Tensor],
    seeds: list[int],
    offsets: list[int],
    inners: list[int],
    rng_state: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """perturb_triton for every tensor of a list in one kernel launch (per dtype group)."""
    op = "perturb_multi_triton"
    check_multi(op, "v", vs, alphas, sigmas, seeds, offsets, inners, rng_state, INTERPRETED)
    vs = [v.contiguous() for v in vs]
    alphas = [a.contiguous() for a in alphas]
    outs = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in vs]
    for (dtype, alpha_dtype, sigma_dtype), idx in _groups(vs, alphas, sigmas).items():
        rows, first, total = [], [], 0
        for i in idx:
            n = vs[i].numel()
            rows.append(
                [
                    vs[i].data_ptr(),
                    outs[i].data_ptr(),
                    alphas[i].data_ptr(),
                    sigmas[i].data_ptr(),
                    n,
                    alphas[i].numel(),
                    inners[i],
                    offsets[i],
                    _seed_of(seeds, i),
                    total,
                ]
            )
            first.append(total)
            total += triton.cdiv(n, BLOCK)
        device = vs[idx[0]].device
        table = _device_table(rows, first, device, op)
        state, has_state = state_args(rng_state, table)
        with launch_guard(device):
            perturb_multi_fwd_kernel[(total,)](
                table,
                state,
                len(idx),
                T_POW2=triton.next_power_of_2(len(idx)),
                BLOCK=BLOCK,
                V_DTYPE=_TL_DTYPE[dtype],
                ALPHA_DTYPE=_TL_DTYPE[alpha_dtype],
                SIGMA_DTYPE=_TL_DTYPE[sigma_dtype],
                IS_F64=dtype == torch.float64,
                INDEX64=any(index64(alphas[i].numel(), inners[i]) for i in idx),
                HAS_STATE=has_state,
                PRECISE=PRECISE,
                num_warps=NUM_WARPS,
            )
    return outs


@perturb_multi_triton.register_fake
def _(vs, alphas, sigmas, seeds, offsets, inners, rng_state=None):
    check_multi("perturb_multi_triton", "v", vs, alphas, sigmas, seeds, offsets, inners, rng_state, INTERPRETED)
    return [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in vs]


@custom_op("pni_fast::perturb_alpha_grad_multi_triton", mutates_args=())
def perturb_alpha_grad_multi_triton(
    grads: list[torch.Tensor],
    alphas: list[torch.Tensor],
    sigmas: list[torch.Tensor],
    seeds: list[int],
    offsets: list[int],
    inners: list[int],
    rng_state: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """perturb_alpha_grad_triton for every tensor of a list: two launches per dtype group."""
    op = "perturb_alpha_grad_multi_triton"
    check_multi(op, "grad", grads, alphas, sigmas, seeds, offsets, inners, rng_state, INTERPRETED)
    grads = [g.contiguous() for g in grads]
    outs = [
        torch.empty(a.shape, dtype=a.dtype, device=a.device)
        if g.numel() > 0
        else torch.zeros(a.shape, dtype=a.dtype, device=a.device)
        for g, a in zip(grads, alphas)
    ]
    for (dtype, alpha_dtype, sigma_dtype), idx in _groups(grads, alphas, sigmas).items():
        is_f64 = dtype == torch.float64
        device = grads[idx[0]].device
        plans = [grad_plan(grads[i].numel(), alphas[i].numel(), inners[i], general=True) for i in idx]
        bases, part_size = [], 0
        for p in plans:
            bases.append(part_size)
            part_size += p.J * p.S
        part = torch.empty(part_size, dtype=torch.float64 if is_f64 else torch.float32, device=device)
        rows1, first1, total1 = [], [], 0
        rows2, first2, total2 = [], [], 0
        block_k, block_j, block_r = reduce_tiles(
            max(alphas[i].numel() for i in idx), max(p.J for p in plans), max(p.R for p in plans)
        )
        for i, p, base in zip(idx, plans, bases):
            n, n_alpha = grads[i].numel(), alphas[i].numel()
            rows1.append(
                [
                    grads[i].data_ptr(),
                    sigmas[i].data_ptr(),
                    base,
                    n,
                    p.inner,
                    p.S,
                    offsets[i],
                    _seed_of(seeds, i),
                    total1,
                ]
            )
            first1.append(total1)
            total1 += triton.cdiv(n, BLOCK)
            rows2.append([base, outs[i].data_ptr(), sigmas[i].data_ptr(), p.S, p.J, n_alpha, p.R, p.inner, n, total2])
            first2.append(total2)
            total2 += triton.cdiv(n_alpha, block_k)
        t = len(idx)
        table1 = _device_table(rows1, first1, device, op)
        table2 = _device_table(rows2, first2, device, op)
        state, has_state = state_args(rng_state, table1)
        with launch_guard(device):
            perturb_multi_bwd_kernel[(total1,)](
                table1,
                part,
                state,
                t,
                T_POW2=triton.next_power_of_2(t),
                BLOCK=BLOCK,
                G_DTYPE=_TL_DTYPE[dtype],
                IS_F64=is_f64,
                INDEX64=any(index64(1, p.inner) for p in plans),
                HAS_STATE=has_state,
                PRECISE=PRECISE,
                num_warps=NUM_WARPS,
            )
            alpha_grad_multi_reduce_kernel[(total2,)](
                table2,
                part,
                t,
                T_POW2=triton.next_power_of_2(t),
                BLOCK=BLOCK,
                BLOCK_K=block_k,
                BLOCK_J=block_j,
                BLOCK_R=block_r,
                OUT_DTYPE=_TL_DTYPE[alpha_dtype],
                SIGMA_DTYPE=_TL_DTYPE[sigma_dtype],
                IS_F64=is_f64,
                num_warps=NUM_WARPS,
            )
    return outs


@perturb_alpha_grad_multi_triton.register_fake
def _(grads, alphas, sigmas, seeds, offsets, inners, rng_state=None):
    check_multi(
        "perturb_alpha_grad_multi_triton", "grad", grads, alphas, sigmas, seeds, offsets, inners, rng_state, INTERPRETED
    )
    return [torch.empty(a.shape, dtype=a.dtype, device=a.device) for a in alphas]
