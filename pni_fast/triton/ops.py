"""Triton backend of pni_fast, registered as PyTorch ops (``torch.ops.pni_fast.*_triton``).

Single-tensor ops are ``torch.library.triton_op``s whose kernels are launched through
``wrap_triton``, so ``torch.compile`` sees (and can fuse around) the Triton kernels. Under the
CPU interpreter (TRITON_INTERPRET=1) a kernel cannot be traced, so there they are opaque
``custom_op``s whose fake kernel is the same body with the launches skipped. The list
ops pass their tensors to one launch through a packed int64 table of raw pointers; pointers the
compiler cannot see must not be traced into a graph, so those two are opaque
``torch.library.custom_op``s with fake kernels (still ``fullgraph``-compatible).

Signatures are those of docs/ops.md (op contract v2), suffixed ``_triton``:

* ``noise_triton(like, seed, offset, rng_state=None) -> Tensor``
* ``perturb_triton(v, alpha, sigma, seed, offset, inner, rng_state=None) -> Tensor``
* ``perturb_alpha_grad_triton(grad, alpha, sigma, seed, offset, inner, rng_state=None) -> Tensor``
* ``perturb_multi_triton(vs, alphas, sigmas, seed, offsets, inners, rng_state=None) -> Tensor[]``
* ``perturb_alpha_grad_multi_triton(grads, alphas, sigmas, seed, offsets, inners, rng_state=None)``

``rng_state`` (int64 [2] on the op's device: seed, counter base) is read by the kernels from
device memory: no host sync, so on CUDA its values are not range-checked (they are the bits of a
uint64 seed and counter); on CPU (interpreter) they get the usual seed/offset checks. alpha may
be float32 with float16/bfloat16 tensors; the alpha gradient has alpha's dtype and is
accumulated in float32 (float64 for float64). Every output is a fresh tensor.

Autograd is registered by ``pni_fast.functional``, not here.

Notes:
* Noise: the compiled kernels evaluate tl.randn4x's formula on tl.randint4x words with libdevice
  logf/cosf/sinf and an IEEE sqrt (tl.sqrt lowers to ``sqrt.approx.ftz`` on sm_90), so z matches
  the CUDA C++ backend; under the CPU interpreter they call tl.randn4x itself.
* The list ops group tensors by (dtype, alpha dtype, sigma dtype): one forward launch and two alpha-gradient
  launches per group. Forward results are bit-identical to the single op; alpha gradients use one
  segmented-scan reduction for every tensor, so they agree with the single op to fp32 rounding.
* The list ops copy their pointer table from pinned memory (non-blocking, no host sync); that copy
  cannot be replayed by a CUDA graph, so they refuse stream capture with a clear error - capture
  the single ops or the CUDA backend's list op (kernel parameters only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from . import kernels as K
from .checks import check_multi, check_noise, check_single, is_fake

__all__ = [
    "noise_triton",
    "perturb_triton",
    "perturb_alpha_grad_triton",
    "perturb_multi_triton",
    "perturb_alpha_grad_multi_triton",
    "INTERPRETED",
]

# Elements per program of the element-wise kernels (BLOCK / 4 Philox counters each).
BLOCK = 1024
NUM_WARPS = 4
# Elements of one stage-2 tile (BLOCK_J * BLOCK_R * BLOCK_K).
_REDUCE_TILE = 4096
_INT32_LIMIT = 2**31
_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}

# True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED: bool = type(K._noise_kernel).__name__ == "InterpretedFunction"
# Compiled kernels compute Box-Muller with libdevice's accurate logf/cosf/sinf (kernels.py,
# _normal_block); the interpreter cannot call libdevice and runs tl.randn4x in numpy instead.
PRECISE: bool = not INTERPRETED


# ---------------------------------------------------------------------------
# Launch plans
# ---------------------------------------------------------------------------


def _index64(n_alpha: int, inner: int) -> bool:
    """Whether the alpha index needs int64 arithmetic in the kernel."""
    return n_alpha + BLOCK >= _INT32_LIMIT or inner + BLOCK >= _INT32_LIMIT


@dataclass(frozen=True)
class _GradPlan:
    """How the alpha gradient of one tensor is reduced (see kernels.py's docstring)."""

    seg_mode: int
    inner: int  # effective inner (layerwise: a multiple of BLOCK covering the whole tensor)
    S: int  # segments
    J: int  # partial slots per segment (max blocks a segment spans)
    R: int  # rows of segments per alpha index
    direct: bool  # elementwise: stage 1 writes the gradient itself


def _grad_plan(n: int, n_alpha: int, inner: int, general: bool = False) -> _GradPlan:
    """Plan for n > 0 elements; ``general`` forces the segmented-scan stage 1 (multi-tensor kernel)."""
    if n_alpha == 1:
        inner = triton.cdiv(n, BLOCK) * BLOCK
    S = triton.cdiv(n, inner)
    R = triton.cdiv(S, n_alpha)
    if inner % BLOCK == 0:
        J = inner // BLOCK
    else:
        J = triton.cdiv(inner - 1, BLOCK) + 1
    if general:
        mode = K.SEG_SCAN
    elif inner % BLOCK == 0:
        mode = K.SEG_ONE
    elif inner > BLOCK:
        mode = K.SEG_TWO
    elif inner == 1:
        mode = K.SEG_ELEM
    else:
        mode = K.SEG_SCAN
    direct = mode == K.SEG_ELEM and n_alpha == n
    return _GradPlan(mode, inner, S, J, R, direct)


def _reduce_tiles(n_alpha: int, J: int, R: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_J, BLOCK_R) of the stage-2 kernel: alpha indices x slots x rows per tile."""
    block_k = min(triton.next_power_of_2(max(n_alpha, 1)), 256)
    budget = _REDUCE_TILE // block_k
    block_j = min(triton.next_power_of_2(max(J, 1)), budget)
    block_r = max(1, min(triton.next_power_of_2(max(R, 1)), budget // block_j))
    return block_k, block_j, block_r


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


def _launch_guard(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _shapes_only(t: torch.Tensor) -> bool:
    """Under the interpreter the op is a custom_op whose fake kernel is the op body itself: on
    FakeTensors (no data) it only allocates the outputs and launches nothing."""
    return INTERPRETED and is_fake(t)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through ``wrap_triton`` (traceable by torch.compile on GPUs)."""
    with _launch_guard(args[0].device):
        wrap_triton(kernel)[grid](*args, **kwargs)


def _single_op(name: str):
    """``triton_op`` on GPUs; under the interpreter an opaque ``custom_op`` (see the module docstring)."""

    def register(fn):
        if not INTERPRETED:
            return triton_op(name, mutates_args=())(fn)
        op = custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register


def _state_args(rng_state: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(state pointer, HAS_STATE): without a state the kernels get an unread input tensor."""
    return (dummy, False) if rng_state is None else (rng_state, True)


# ---------------------------------------------------------------------------
# Single-tensor ops
# ---------------------------------------------------------------------------


@_single_op("pni_fast::noise_triton")
def noise_triton(like: torch.Tensor, seed: int, offset: int, rng_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 z with ``like``'s shape: element i is output i % 4 of Philox counter offset + i // 4."""
    check_noise("noise_triton", like, seed, offset, rng_state, INTERPRETED)
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    n = out.numel()
    if n == 0 or _shapes_only(like):
        return out
    state, has_state = _state_args(rng_state, like)
    _launch(
        K._noise_kernel,
        (triton.cdiv(n, BLOCK),),
        out,
        state,
        n,
        seed,
        offset,
        BLOCK=BLOCK,
        HAS_STATE=has_state,
        PRECISE=PRECISE,
        num_warps=NUM_WARPS,
    )
    return out


@_single_op("pni_fast::perturb_triton")
def perturb_triton(
    v: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    seed: int,
    offset: int,
    inner: int,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out = v + alpha[(i // inner) % alpha.numel()] * sigma * z_i in one pass (no stored noise)."""
    check_single("perturb_triton", "v", v, alpha, sigma, seed, offset, inner, rng_state, INTERPRETED)
    v = v.contiguous()
    alpha = alpha.contiguous()
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    n, n_alpha = v.numel(), alpha.numel()
    if n == 0 or _shapes_only(v):
        return out
    state, has_state = _state_args(rng_state, sigma)
    _launch(
        K._perturb_fwd_kernel,
        (triton.cdiv(n, BLOCK),),
        v,
        out,
        alpha,
        sigma,
        state,
        n,
        n_alpha,
        inner,
        seed,
        offset,
        BLOCK=BLOCK,
        LAYERWISE=n_alpha == 1,
        IS_F64=v.dtype == torch.float64,
        INDEX64=_index64(n_alpha, inner),
        HAS_STATE=has_state,
        PRECISE=PRECISE,
        num_warps=NUM_WARPS,
    )
    return out


@_single_op("pni_fast::perturb_alpha_grad_triton")
def perturb_alpha_grad_triton(
    grad: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    seed: int,
    offset: int,
    inner: int,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dL/dalpha[k] = sum over i with b(i) == k of grad_i * sigma * z_i, deterministic (two stages)."""
    check_single("perturb_alpha_grad_triton", "grad", grad, alpha, sigma, seed, offset, inner, rng_state, INTERPRETED)
    grad = grad.contiguous()
    n, n_alpha = grad.numel(), alpha.numel()
    if n == 0:
        return torch.zeros(alpha.shape, dtype=alpha.dtype, device=alpha.device)
    out = torch.empty(alpha.shape, dtype=alpha.dtype, device=alpha.device)
    if _shapes_only(grad):
        return out
    is_f64 = grad.dtype == torch.float64
    plan = _grad_plan(n, n_alpha, inner)
    state, has_state = _state_args(rng_state, sigma)
    # The elementwise plan writes the gradient itself: part_ptr is unused, pass out.
    part = (
        out
        if plan.direct
        else torch.empty(plan.J * plan.S, dtype=torch.float64 if is_f64 else torch.float32, device=grad.device)
    )
    _launch(
        K._perturb_bwd_kernel,
        (triton.cdiv(n, BLOCK),),
        grad,
        part,
        out,
        sigma,
        state,
        n,
        plan.inner,
        plan.S,
        seed,
        offset,
        BLOCK=BLOCK,
        SEG_MODE=plan.seg_mode,
        IS_F64=is_f64,
        DIRECT=plan.direct,
        INDEX64=_index64(1, plan.inner),
        HAS_STATE=has_state,
        PRECISE=PRECISE,
        num_warps=NUM_WARPS,
    )
    if not plan.direct:
        block_k, block_j, block_r = _reduce_tiles(n_alpha, plan.J, plan.R)
        _launch(
            K._alpha_grad_reduce_kernel,
            (triton.cdiv(n_alpha, block_k),),
            part,
            out,
            sigma,
            plan.S,
            plan.J,
            n_alpha,
            plan.R,
            plan.inner,
            n,
            BLOCK=BLOCK,
            BLOCK_K=block_k,
            BLOCK_J=block_j,
            BLOCK_R=block_r,
            IS_F64=is_f64,
            num_warps=NUM_WARPS,
        )
    return out


# ---------------------------------------------------------------------------
# Multi-tensor ops: one launch per (dtype, alpha dtype, sigma dtype) group through a pointer table
# ---------------------------------------------------------------------------


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
    seed: int,
    offsets: list[int],
    inners: list[int],
    rng_state: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """perturb_triton for every tensor of a list in one kernel launch (per dtype group)."""
    op = "perturb_multi_triton"
    check_multi(op, "v", vs, alphas, sigmas, seed, offsets, inners, rng_state, INTERPRETED)
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
                    total,
                ]
            )
            first.append(total)
            total += triton.cdiv(n, BLOCK)
        device = vs[idx[0]].device
        table = _device_table(rows, first, device, op)
        state, has_state = _state_args(rng_state, table)
        with _launch_guard(device):
            K._perturb_multi_fwd_kernel[(total,)](
                table,
                state,
                len(idx),
                seed,
                T_POW2=triton.next_power_of_2(len(idx)),
                BLOCK=BLOCK,
                V_DTYPE=_TL_DTYPE[dtype],
                ALPHA_DTYPE=_TL_DTYPE[alpha_dtype],
                SIGMA_DTYPE=_TL_DTYPE[sigma_dtype],
                IS_F64=dtype == torch.float64,
                INDEX64=any(_index64(alphas[i].numel(), inners[i]) for i in idx),
                HAS_STATE=has_state,
                PRECISE=PRECISE,
                num_warps=NUM_WARPS,
            )
    return outs


@perturb_multi_triton.register_fake
def _(vs, alphas, sigmas, seed, offsets, inners, rng_state=None):
    check_multi("perturb_multi_triton", "v", vs, alphas, sigmas, seed, offsets, inners, rng_state, INTERPRETED)
    return [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in vs]


@custom_op("pni_fast::perturb_alpha_grad_multi_triton", mutates_args=())
def perturb_alpha_grad_multi_triton(
    grads: list[torch.Tensor],
    alphas: list[torch.Tensor],
    sigmas: list[torch.Tensor],
    seed: int,
    offsets: list[int],
    inners: list[int],
    rng_state: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """perturb_alpha_grad_triton for every tensor of a list: two launches per dtype group."""
    op = "perturb_alpha_grad_multi_triton"
    check_multi(op, "grad", grads, alphas, sigmas, seed, offsets, inners, rng_state, INTERPRETED)
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
        plans = [_grad_plan(grads[i].numel(), alphas[i].numel(), inners[i], general=True) for i in idx]
        bases, part_size = [], 0
        for p in plans:
            bases.append(part_size)
            part_size += p.J * p.S
        part = torch.empty(part_size, dtype=torch.float64 if is_f64 else torch.float32, device=device)
        rows1, first1, total1 = [], [], 0
        rows2, first2, total2 = [], [], 0
        block_k, block_j, block_r = _reduce_tiles(
            max(alphas[i].numel() for i in idx), max(p.J for p in plans), max(p.R for p in plans)
        )
        for i, p, base in zip(idx, plans, bases):
            n, n_alpha = grads[i].numel(), alphas[i].numel()
            rows1.append([grads[i].data_ptr(), sigmas[i].data_ptr(), base, n, p.inner, p.S, offsets[i], total1])
            first1.append(total1)
            total1 += triton.cdiv(n, BLOCK)
            rows2.append([base, outs[i].data_ptr(), sigmas[i].data_ptr(), p.S, p.J, n_alpha, p.R, p.inner, n, total2])
            first2.append(total2)
            total2 += triton.cdiv(n_alpha, block_k)
        t = len(idx)
        table1 = _device_table(rows1, first1, device, op)
        table2 = _device_table(rows2, first2, device, op)
        state, has_state = _state_args(rng_state, table1)
        with _launch_guard(device):
            K._perturb_multi_bwd_kernel[(total1,)](
                table1,
                part,
                state,
                t,
                seed,
                T_POW2=triton.next_power_of_2(t),
                BLOCK=BLOCK,
                G_DTYPE=_TL_DTYPE[dtype],
                IS_F64=is_f64,
                INDEX64=any(_index64(1, p.inner) for p in plans),
                HAS_STATE=has_state,
                PRECISE=PRECISE,
                num_warps=NUM_WARPS,
            )
            K._alpha_grad_multi_reduce_kernel[(total2,)](
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
def _(grads, alphas, sigmas, seed, offsets, inners, rng_state=None):
    check_multi(
        "perturb_alpha_grad_multi_triton", "grad", grads, alphas, sigmas, seed, offsets, inners, rng_state, INTERPRETED
    )
    return [torch.empty(a.shape, dtype=a.dtype, device=a.device) for a in alphas]
