"""Triton forward kernel: ``out = v + alpha[b(i)] * sigma * z`` in one pass, no stored noise.

``perturb_block`` is the body shared with the list kernel (list_kernels.py); ``_alpha_index``
computes ``b(i) = (i // inner) % n_alpha`` with int32 arithmetic unless INDEX64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .noise_kernels import normal_block, rng_key

__all__: list[str] = []  # the kernels, launched by single_ops / list_ops


@triton.jit
def _alpha_index(start, n_alpha, inner, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    """``(i // inner) % n_alpha`` for ``i = start + arange(BLOCK)``, with one int64 division per block."""
    local = tl.arange(0, BLOCK)
    k0 = (start // inner) % n_alpha
    r0 = start % inner
    if INDEX64:
        return (k0 + (r0 + local.to(tl.int64)) // inner) % n_alpha
    else:
        # Host guarantees inner + BLOCK and n_alpha + BLOCK fit in int32.
        # (tl.cast also accepts inner == 1, which Triton passes as a constexpr)
        k32 = k0.to(tl.int32) + (r0.to(tl.int32) + local) // tl.cast(inner, tl.int32)
        return k32 % tl.cast(n_alpha, tl.int32)


@triton.jit
def perturb_block(
    v_ptr,
    out_ptr,
    alpha_ptr,
    sigma_ptr,
    n,
    n_alpha,
    inner,
    seed,
    offset,
    block,
    BLOCK: tl.constexpr,
    LAYERWISE: tl.constexpr,
    IS_F64: tl.constexpr,
    INDEX64: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """out = v + alpha[b(i)] * sigma * z for one block of BLOCK elements."""
    start = block * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    z = normal_block(seed, offset, start, BLOCK, PRECISE)
    if LAYERWISE:
        a = tl.load(alpha_ptr)
    else:
        a = tl.load(alpha_ptr + _alpha_index(start, n_alpha, inner, BLOCK, INDEX64), mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    s = tl.load(sigma_ptr)
    if IS_F64:
        out = v.to(tl.float64) + (a.to(tl.float64) * s.to(tl.float64)) * z.to(tl.float64)
    else:
        out = v.to(tl.float32) + (a.to(tl.float32) * s.to(tl.float32)) * z
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def perturb_fwd_kernel(
    v_ptr,
    out_ptr,
    alpha_ptr,
    sigma_ptr,
    state_ptr,
    n,
    n_alpha,
    inner,
    seed,
    offset,
    BLOCK: tl.constexpr,
    LAYERWISE: tl.constexpr,
    IS_F64: tl.constexpr,
    INDEX64: tl.constexpr,
    HAS_STATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """One program per BLOCK elements (BLOCK / 4 Philox counters)."""
    seed, offset = rng_key(seed, offset, state_ptr, HAS_STATE)
    block = tl.program_id(0).to(tl.int64)
    perturb_block(
        v_ptr,
        out_ptr,
        alpha_ptr,
        sigma_ptr,
        n,
        n_alpha,
        inner,
        seed,
        offset,
        block,
        BLOCK,
        LAYERWISE,
        IS_F64,
        INDEX64,
        PRECISE,
    )
