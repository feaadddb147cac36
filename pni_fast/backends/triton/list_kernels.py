"""Triton kernels of the list ops (``*_multi_*``): one launch for a list of tensors sharing dtypes.

Each program finds its tensor in a packed int64 table (pointers, sizes, offsets) built on the
host (list_ops.py) and runs the single-tensor body of perturb_kernels.py / alpha_grad_kernels.py
on it; stage 1 of the gradient always uses the segmented scan.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .alpha_grad_kernels import grad_z_block, reduce_segments, scan_partials_block
from .noise_kernels import rng_key
from .perturb_kernels import perturb_block

__all__: list[str] = []  # the kernels, launched by single_ops / list_ops


@triton.jit
def _find_tensor(table_ptr, pid, T, COLS: tl.constexpr, T_POW2: tl.constexpr):
    """Row of the tensor owning program ``pid``. The table ends with the T first-block indices
    (ascending); the owner is the number of tensors starting at or before ``pid``, minus one."""
    t = tl.arange(0, T_POW2)
    starts = tl.load(table_ptr + T * COLS + t, mask=t < T, other=0x7FFFFFFFFFFFFFFF)
    owner = tl.sum((starts <= pid).to(tl.int64), axis=0) - 1
    return table_ptr + owner * COLS


@triton.jit
def perturb_multi_fwd_kernel(
    table_ptr,
    state_ptr,
    T,
    T_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    V_DTYPE: tl.constexpr,
    ALPHA_DTYPE: tl.constexpr,
    SIGMA_DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    INDEX64: tl.constexpr,
    HAS_STATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Forward for T tensors; table row = (v, out, alpha, sigma, n, n_alpha, inner, offset, seed, first block).

    INDEX64: some tensor of the launch needs int64 alpha-index arithmetic (host-chosen per group).
    """
    pid = tl.program_id(0).to(tl.int64)
    row = _find_tensor(table_ptr, pid, T, 10, T_POW2)
    v_ptr = tl.load(row + 0).to(tl.pointer_type(V_DTYPE))
    out_ptr = tl.load(row + 1).to(tl.pointer_type(V_DTYPE))
    alpha_ptr = tl.load(row + 2).to(tl.pointer_type(ALPHA_DTYPE))
    sigma_ptr = tl.load(row + 3).to(tl.pointer_type(SIGMA_DTYPE))
    n = tl.load(row + 4)
    n_alpha = tl.load(row + 5)
    inner = tl.load(row + 6)
    seed, offset = rng_key(tl.load(row + 8), tl.load(row + 7), state_ptr, HAS_STATE)
    block = pid - tl.load(row + 9)
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
        False,
        IS_F64,
        INDEX64,
        PRECISE,
    )


@triton.jit
def perturb_multi_bwd_kernel(
    table_ptr,
    part_ptr,
    state_ptr,
    T,
    T_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    G_DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    INDEX64: tl.constexpr,
    HAS_STATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Stage 1 for T tensors (segmented scan for every inner); row = (grad, sigma, part base, n,
    inner, S, offset, seed, first block)."""
    pid = tl.program_id(0).to(tl.int64)
    row = _find_tensor(table_ptr, pid, T, 9, T_POW2)
    g_ptr = tl.load(row + 0).to(tl.pointer_type(G_DTYPE))
    base = tl.load(row + 2)
    n = tl.load(row + 3)
    inner = tl.load(row + 4)
    S = tl.load(row + 5)
    seed, offset = rng_key(tl.load(row + 7), tl.load(row + 6), state_ptr, HAS_STATE)
    block = pid - tl.load(row + 8)
    _, _, vals = grad_z_block(g_ptr, n, seed, offset, block * BLOCK, BLOCK, IS_F64, PRECISE)
    scan_partials_block(part_ptr + base, vals, n, inner, S, block, BLOCK, INDEX64)


@triton.jit
def alpha_grad_multi_reduce_kernel(
    table_ptr,
    part_ptr,
    T,
    T_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    SIGMA_DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """Stage 2 for T tensors; row = (part base, out, sigma, S, J, n_alpha, R, inner, n, first block)."""
    pid = tl.program_id(0).to(tl.int64)
    row = _find_tensor(table_ptr, pid, T, 10, T_POW2)
    base = tl.load(row + 0)
    out_ptr = tl.load(row + 1).to(tl.pointer_type(OUT_DTYPE))
    sigma_ptr = tl.load(row + 2).to(tl.pointer_type(SIGMA_DTYPE))
    S = tl.load(row + 3)
    J = tl.load(row + 4)
    n_alpha = tl.load(row + 5)
    R = tl.load(row + 6)
    inner = tl.load(row + 7)
    n = tl.load(row + 8)
    kb = pid - tl.load(row + 9)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    acc = reduce_segments(part_ptr + base, k, S, J, n_alpha, R, inner, n, BLOCK, BLOCK_J, BLOCK_R, IS_F64)
    s = tl.load(sigma_ptr)
    if IS_F64:
        acc = acc * s.to(tl.float64)
    else:
        acc = acc * s.to(tl.float32)
    tl.store(out_ptr + k, acc.to(OUT_DTYPE), mask=k < n_alpha)
