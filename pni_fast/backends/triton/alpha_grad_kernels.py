"""Triton kernels of the alpha gradient (backward), deterministic in two stages.

Stage 1 (``perturb_bwd_kernel``) writes one partial sum of ``g * z`` per (block, alpha segment)
into a ``[J, S]`` buffer, where a *segment* is a run of ``inner`` consecutive elements that share
one alpha index, ``S = ceil(n / inner)`` and ``J`` bounds the number of blocks a segment spans;
stage 2 (``alpha_grad_reduce_kernel``) sums those partials in a fixed order, first over ``j``
then over the rows ``r`` of segments ``s = r * n_alpha + k``. No atomics, so one seed gives the
same gradient bits on every run. The host picks SEG_MODE and the buffer sizes (launch_config.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .noise_kernels import normal_block, rng_key

__all__: list[str] = []  # the kernels, launched by single_ops / list_ops

# Segment modes of the single-tensor backward kernel (constexpr SEG_MODE).
SEG_ONE = 0  # inner % BLOCK == 0 (layerwise too): a block lies inside one segment -> tl.sum
SEG_TWO = 1  # inner > BLOCK: a block touches at most two segments -> two masked sums
SEG_SCAN = 2  # any inner: segmented scan, the last element of each run stores its sum
SEG_ELEM = 3  # inner == 1: every element is its own segment


@triton.jit
def _segsum_combine(flag_a, val_a, flag_b, val_b):
    """Segmented-sum operator: a set flag starts a new run, so the sum restarts there."""
    return flag_a | flag_b, tl.where(flag_b != 0, val_b, val_a + val_b)


@triton.jit
def grad_z_block(g_ptr, n, seed, offset, start, BLOCK: tl.constexpr, IS_F64: tl.constexpr, PRECISE: tl.constexpr):
    """(offs, mask, g * z) for one block, in the accumulation dtype (0 outside the tensor)."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    z = normal_block(seed, offset, start, BLOCK, PRECISE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if IS_F64:
        vals = g.to(tl.float64) * z.to(tl.float64)
    else:
        vals = g.to(tl.float32) * z
    return offs, mask, tl.where(mask, vals, 0.0)


@triton.jit
def scan_partials_block(part_ptr, vals, n, inner, S, block, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    """Stage 1 for any ``inner``: per-run sums by a segmented scan, stored at ``[block - p0(s), s]``.

    Positions are taken relative to the block's first segment, so the per-element division is
    an int32 one (int64 only with INDEX64, when inner + BLOCK does not fit int32).
    """
    local = tl.arange(0, BLOCK)
    start = block * BLOCK
    s0 = start // inner  # first segment touching this block (scalar int64 arithmetic)
    r0 = start - s0 * inner  # position of the block's first element inside it
    if INDEX64:
        pos = r0 + local.to(tl.int64)
        q = pos // inner
        rem = pos - q * inner
    else:
        inner32 = tl.cast(inner, tl.int32)
        pos = r0.to(tl.int32) + local
        q = pos // inner32
        rem = pos - q * inner32
    seg = s0 + q.to(tl.int64)
    count = tl.minimum(n - start, BLOCK).to(tl.int32)  # elements of the tensor in this block
    first = (rem == 0) | (local == 0)
    last = (rem == inner - 1) | (local == count - 1)
    _, run = tl.associative_scan((first.to(tl.int32), vals), 0, _segsum_combine)
    # Segment s0 started ceil(r0 / BLOCK) blocks before this one; later segments start here (slot 0).
    slot0 = (r0 + BLOCK - 1) // BLOCK
    slot = tl.where(q == 0, slot0, 0)
    tl.store(part_ptr + slot * S + seg, run, mask=(local < count) & last)


@triton.jit(do_not_specialize=["seed", "offset"])
def perturb_bwd_kernel(
    g_ptr,
    part_ptr,
    out_ptr,
    sigma_ptr,
    state_ptr,
    n,
    inner,
    S,
    seed,
    offset,
    BLOCK: tl.constexpr,
    SEG_MODE: tl.constexpr,
    IS_F64: tl.constexpr,
    DIRECT: tl.constexpr,
    INDEX64: tl.constexpr,
    HAS_STATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Stage 1 of the alpha gradient: partial sums of g * z per (block, segment).

    With SEG_MODE == SEG_ELEM and DIRECT (elementwise alpha, n_alpha == n) the result
    ``g * z * sigma`` goes straight to the gradient ``out_ptr`` and stage 2 is skipped.
    """
    seed, offset = rng_key(seed, offset, state_ptr, HAS_STATE)
    block = tl.program_id(0).to(tl.int64)
    start = block * BLOCK
    offs, mask, vals = grad_z_block(g_ptr, n, seed, offset, start, BLOCK, IS_F64, PRECISE)
    if SEG_MODE == 0:  # SEG_ONE
        s0 = start // inner
        tl.store(part_ptr + (block - (s0 * inner) // BLOCK) * S + s0, tl.sum(vals, axis=0))
    elif SEG_MODE == 1:  # SEG_TWO
        s0 = start // inner
        second = offs // inner != s0
        lo = tl.sum(tl.where(second, 0.0, vals), axis=0)
        hi = tl.sum(tl.where(second, vals, 0.0), axis=0)
        tl.store(part_ptr + (block - (s0 * inner) // BLOCK) * S + s0, lo)
        s1 = s0 + 1
        # Segment s1 starts inside this block (so its slot is 0) when its first element exists here.
        if (s1 * inner < start + BLOCK) & (s1 * inner < n):
            tl.store(part_ptr + s1, hi)
    elif SEG_MODE == 2:  # SEG_SCAN
        scan_partials_block(part_ptr, vals, n, inner, S, block, BLOCK, INDEX64)
    else:  # SEG_ELEM
        if DIRECT:
            s = tl.load(sigma_ptr)
            if IS_F64:
                res = vals * s.to(tl.float64)
            else:
                res = vals * s.to(tl.float32)
            tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + offs, vals, mask=mask)


@triton.jit
def reduce_segments(
    part_ptr,
    k,
    S,
    J,
    n_alpha,
    R,
    inner,
    n,
    BLOCK: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """Fixed-order sum of the stage-1 partials of the alpha indices ``k`` (a vector of BLOCK_K).

    Tiles are [BLOCK_J slots, BLOCK_R rows, BLOCK_K indices]; slot j of segment s exists when
    j < (number of blocks that segment s spans), other entries are masked.
    """
    if IS_F64:
        acc = tl.zeros(k.shape, dtype=tl.float64)
    else:
        acc = tl.zeros(k.shape, dtype=tl.float32)
    jj = tl.arange(0, BLOCK_J).to(tl.int64)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    # while loops with int64 carries: the interpreter cannot take a runtime scalar as a range() bound.
    r0 = tl.full([], 0, tl.int64)
    while r0 < R:
        r = r0 + rr
        s = r[:, None] * n_alpha + k[None, :]  # [BLOCK_R, BLOCK_K]
        valid = (k[None, :] < n_alpha) & (r[:, None] < R) & (s < S)
        seg_start = s * inner
        p0 = seg_start // BLOCK
        p1 = (tl.minimum(seg_start + inner, n) - 1) // BLOCK
        count = p1 - p0 + 1
        j0 = tl.full([], 0, tl.int64)
        while j0 < J:
            j = j0 + jj
            m = valid[None, :, :] & (j[:, None, None] < count[None, :, :])
            x = tl.load(part_ptr + j[:, None, None] * S + s[None, :, :], mask=m, other=0.0)
            acc += tl.sum(tl.sum(x, axis=0), axis=0)
            j0 += BLOCK_J
        r0 += BLOCK_R
    return acc


@triton.jit
def alpha_grad_reduce_kernel(
    part_ptr,
    out_ptr,
    sigma_ptr,
    S,
    J,
    n_alpha,
    R,
    inner,
    n,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IS_F64: tl.constexpr,
):
    """Stage 2 of the alpha gradient: dalpha[k] = sigma * sum_r sum_j part[j, r * n_alpha + k]."""
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    acc = reduce_segments(part_ptr, k, S, J, n_alpha, R, inner, n, BLOCK, BLOCK_J, BLOCK_R, IS_F64)
    s = tl.load(sigma_ptr)
    if IS_F64:
        acc = acc * s.to(tl.float64)
    else:
        acc = acc * s.to(tl.float32)
    tl.store(out_ptr + k, acc.to(out_ptr.dtype.element_ty), mask=k < n_alpha)
