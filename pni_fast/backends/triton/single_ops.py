"""Single-tensor ops of the Triton backend: ``noise_triton``, ``perturb_triton``, ``perturb_alpha_grad_triton``.

They are ``torch.library.triton_op``s whose kernels are launched through ``wrap_triton``, so
``torch.compile`` sees (and can fuse around) the Triton kernels. Under the CPU interpreter
(TRITON_INTERPRET=1) a kernel cannot be traced, so there they are opaque ``custom_op``s whose
fake kernel is the same body with the launches skipped. Signatures and notes: the package docstring.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from ...contract import is_fake
from .alpha_grad_kernels import alpha_grad_reduce_kernel, perturb_bwd_kernel
from .checks import check_noise, check_single
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
from .noise_kernels import noise_kernel
from .perturb_kernels import perturb_fwd_kernel

__all__ = ["noise_triton", "perturb_triton", "perturb_alpha_grad_triton"]


def _shapes_only(t: torch.Tensor) -> bool:
    """Under the interpreter the op is a custom_op whose fake kernel is the op body itself: on
    FakeTensors (no data) it only allocates the outputs and launches nothing."""
    return INTERPRETED and is_fake(t)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through ``wrap_triton`` (traceable by torch.compile on GPUs)."""
    with launch_guard(args[0].device):
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


@_single_op("pni_fast::noise_triton")
def noise_triton(like: torch.Tensor, seed: int, offset: int, rng_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 z with ``like``'s shape: element i is output i % 4 of Philox counter offset + i // 4."""
    check_noise("noise_triton", like, seed, offset, rng_state, INTERPRETED)
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    n = out.numel()
    if n == 0 or _shapes_only(like):
        return out
    state, has_state = state_args(rng_state, like)
    _launch(
        noise_kernel,
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
    state, has_state = state_args(rng_state, sigma)
    _launch(
        perturb_fwd_kernel,
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
        INDEX64=index64(n_alpha, inner),
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
    plan = grad_plan(n, n_alpha, inner)
    state, has_state = state_args(rng_state, sigma)
    # The elementwise plan writes the gradient itself: part_ptr is unused, pass out.
    part = (
        out
        if plan.direct
        else torch.empty(plan.J * plan.S, dtype=torch.float64 if is_f64 else torch.float32, device=grad.device)
    )
    _launch(
        perturb_bwd_kernel,
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
        INDEX64=index64(1, plan.inner),
        HAS_STATE=has_state,
        PRECISE=PRECISE,
        num_warps=NUM_WARPS,
    )
    if not plan.direct:
        block_k, block_j, block_r = reduce_tiles(n_alpha, plan.J, plan.R)
        _launch(
            alpha_grad_reduce_kernel,
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
