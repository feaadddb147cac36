"""Triton kernels of pni_fast: noise, perturb (forward) and the alpha gradient (backward).

Every kernel draws its noise with ``tl.randn4x(seed, offset + i // 4)`` and interleaves the
four outputs back to element order, so element ``i`` gets output ``i % 4`` of Philox counter
``offset + i // 4`` (design.md section 3): one Philox call per four elements.

The alpha gradient is deterministic: stage 1 (``_perturb_bwd_kernel``) writes one partial sum
per (block, alpha segment) into a ``[J, S]`` buffer, where a *segment* is a run of ``inner``
consecutive elements that share one alpha index, ``S = ceil(n / inner)`` and ``J`` bounds the
number of blocks a segment spans; stage 2 (``_alpha_grad_reduce_kernel``) sums those partials in
a fixed order, first over ``j`` then over the rows ``r`` of segments ``s = r * n_alpha + k``.
No atomics, so one seed gives the same gradient bits on every run.

The ``*_multi_*`` kernels do the same for a list of tensors in one launch; each program finds
its tensor in a packed int64 table (pointers, sizes, offsets) built on the host.

``rng_state`` (op contract v2): with the constexpr HAS_STATE the kernels load
``seed = state[0]`` and ``counter base = state[1] + offset`` from device memory (no host sync;
CUDA graphs replay the load), otherwise they use the ``seed`` / ``offset`` arguments.

Specialization: Triton compiles one variant per integer argument that equals 1 or is divisible
by 16; ``seed`` and ``offset`` change from call to call, so every seeded kernel lists them in
``do_not_specialize`` (one compiled kernel for every drawn seed). Sizes (n, inner, ...) keep the
specialization: they are fixed per layer and n % 16 == 0 lets the masked accesses vectorize.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__: list[str] = []  # private module: the ops live in pni_fast.triton.ops

# Segment modes of the single-tensor backward kernel (constexpr SEG_MODE).
SEG_ONE = 0  # inner % BLOCK == 0 (layerwise too): a block lies inside one segment -> tl.sum
SEG_TWO = 1  # inner > BLOCK: a block touches at most two segments -> two masked sums
SEG_SCAN = 2  # any inner: segmented scan, the last element of each run stores its sum
SEG_ELEM = 3  # inner == 1: every element is its own segment


@triton.jit
def _uniform(x):
    """The contract's word -> [0, 1) map (tl.randn4x's uint_to_uniform_float for 32-bit words)."""
    x = x.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _box_muller(wa, wb):
    """(r cos t, r sin t) with accurate libdevice logf/cosf/sinf and an IEEE sqrt."""
    u1 = tl.maximum(1.0e-7, _uniform(wa))
    t = 6.2831855 * _uniform(wb)
    r = tl.sqrt_rn(-2.0 * libdevice.log(u1))
    return r * libdevice.cos(t), r * libdevice.sin(t)


@triton.jit
def _rng_key(seed, offset, state_ptr, HAS_STATE: tl.constexpr):
    """(seed, counter base): the arguments, or rng_state[0] and rng_state[1] + offset from memory."""
    if HAS_STATE:
        seed = tl.load(state_ptr)
        offset = tl.load(state_ptr + 1) + offset
    return seed, offset


@triton.jit
def _normal_block(seed, offset, start, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    """z of elements ``start .. start + BLOCK - 1`` (``start`` a multiple of 4), element order.

    PRECISE (compiled kernels): tl.randint4x words through the same uniform/Box-Muller formula as
    tl.randn4x but with accurate libdevice math, so z matches the CUDA backend (accurate logf,
    cosf, sinf) within the 2e-6 contract whatever approximations tl.math lowers to. Otherwise
    (the CPU interpreter, which cannot call libdevice): tl.randn4x itself, evaluated in numpy fp32.
    """
    quad = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    if PRECISE:
        w0, w1, w2, w3 = tl.randint4x(seed, offset + quad)
        z0, z1 = _box_muller(w0, w1)
        z2, z3 = _box_muller(w2, w3)
    else:
        z0, z1, z2, z3 = tl.randn4x(seed, offset + quad)
    # join(join(z0, z2), join(z1, z3))[q, a, b] = z_{2a + b}: row-major flattening gives
    # z0, z1, z2, z3 of quad q at positions 4q .. 4q + 3.
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])


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
def _perturb_block(
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
    z = _normal_block(seed, offset, start, BLOCK, PRECISE)
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
def _noise_kernel(
    out_ptr, state_ptr, n, seed, offset, BLOCK: tl.constexpr, HAS_STATE: tl.constexpr, PRECISE: tl.constexpr
):
    """float32 z of n elements."""
    seed, offset = _rng_key(seed, offset, state_ptr, HAS_STATE)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    z = _normal_block(seed, offset, start, BLOCK, PRECISE)
    tl.store(out_ptr + offs, z, mask=offs < n)


@triton.jit(do_not_specialize=["seed", "offset"])
def _perturb_fwd_kernel(
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
    seed, offset = _rng_key(seed, offset, state_ptr, HAS_STATE)
    block = tl.program_id(0).to(tl.int64)
    _perturb_block(
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


@triton.jit
def _segsum_combine(flag_a, val_a, flag_b, val_b):
    """Segmented-sum operator: a set flag starts a new run, so the sum restarts there."""
    return flag_a | flag_b, tl.where(flag_b != 0, val_b, val_a + val_b)


@triton.jit
def _grad_z_block(g_ptr, n, seed, offset, start, BLOCK: tl.constexpr, IS_F64: tl.constexpr, PRECISE: tl.constexpr):
    """(offs, mask, g * z) for one block, in the accumulation dtype (0 outside the tensor)."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    z = _normal_block(seed, offset, start, BLOCK, PRECISE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if IS_F64:
        vals = g.to(tl.float64) * z.to(tl.float64)
    else:
        vals = g.to(tl.float32) * z
    return offs, mask, tl.where(mask, vals, 0.0)


@triton.jit
def _scan_partials_block(part_ptr, vals, n, inner, S, block, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
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
def _perturb_bwd_kernel(
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
    seed, offset = _rng_key(seed, offset, state_ptr, HAS_STATE)
    block = tl.program_id(0).to(tl.int64)
    start = block * BLOCK
    offs, mask, vals = _grad_z_block(g_ptr, n, seed, offset, start, BLOCK, IS_F64, PRECISE)
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
        _scan_partials_block(part_ptr, vals, n, inner, S, block, BLOCK, INDEX64)
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
def _reduce_segments(
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
def _alpha_grad_reduce_kernel(
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
    acc = _reduce_segments(part_ptr, k, S, J, n_alpha, R, inner, n, BLOCK, BLOCK_J, BLOCK_R, IS_F64)
    s = tl.load(sigma_ptr)
    if IS_F64:
        acc = acc * s.to(tl.float64)
    else:
        acc = acc * s.to(tl.float32)
    tl.store(out_ptr + k, acc.to(out_ptr.dtype.element_ty), mask=k < n_alpha)


# ---------------------------------------------------------------------------
# Multi-tensor kernels: one launch for a list of tensors sharing dtypes.
# ---------------------------------------------------------------------------


@triton.jit
def _find_tensor(table_ptr, pid, T, COLS: tl.constexpr, T_POW2: tl.constexpr):
    """Row of the tensor owning program ``pid``. The table ends with the T first-block indices
    (ascending); the owner is the number of tensors starting at or before ``pid``, minus one."""
    t = tl.arange(0, T_POW2)
    starts = tl.load(table_ptr + T * COLS + t, mask=t < T, other=0x7FFFFFFFFFFFFFFF)
    owner = tl.sum((starts <= pid).to(tl.int64), axis=0) - 1
    return table_ptr + owner * COLS


@triton.jit(do_not_specialize=["seed"])
def _perturb_multi_fwd_kernel(
    table_ptr,
    state_ptr,
    T,
    seed,
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
    """Forward for T tensors; table row = (v, out, alpha, sigma, n, n_alpha, inner, offset, first block).

    INDEX64: some tensor of the launch needs int64 alpha-index arithmetic (host-chosen per group).
    """
    pid = tl.program_id(0).to(tl.int64)
    row = _find_tensor(table_ptr, pid, T, 9, T_POW2)
    v_ptr = tl.load(row + 0).to(tl.pointer_type(V_DTYPE))
    out_ptr = tl.load(row + 1).to(tl.pointer_type(V_DTYPE))
    alpha_ptr = tl.load(row + 2).to(tl.pointer_type(ALPHA_DTYPE))
    sigma_ptr = tl.load(row + 3).to(tl.pointer_type(SIGMA_DTYPE))
    n = tl.load(row + 4)
    n_alpha = tl.load(row + 5)
    inner = tl.load(row + 6)
    seed, offset = _rng_key(seed, tl.load(row + 7), state_ptr, HAS_STATE)
    block = pid - tl.load(row + 8)
    _perturb_block(
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


@triton.jit(do_not_specialize=["seed"])
def _perturb_multi_bwd_kernel(
    table_ptr,
    part_ptr,
    state_ptr,
    T,
    seed,
    T_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    G_DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    INDEX64: tl.constexpr,
    HAS_STATE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Stage 1 for T tensors (segmented scan for every inner); row = (grad, sigma, part base, n,
    inner, S, offset, first block)."""
    pid = tl.program_id(0).to(tl.int64)
    row = _find_tensor(table_ptr, pid, T, 8, T_POW2)
    g_ptr = tl.load(row + 0).to(tl.pointer_type(G_DTYPE))
    base = tl.load(row + 2)
    n = tl.load(row + 3)
    inner = tl.load(row + 4)
    S = tl.load(row + 5)
    seed, offset = _rng_key(seed, tl.load(row + 6), state_ptr, HAS_STATE)
    block = pid - tl.load(row + 7)
    _, _, vals = _grad_z_block(g_ptr, n, seed, offset, block * BLOCK, BLOCK, IS_F64, PRECISE)
    _scan_partials_block(part_ptr + base, vals, n, inner, S, block, BLOCK, INDEX64)


@triton.jit
def _alpha_grad_multi_reduce_kernel(
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
    acc = _reduce_segments(part_ptr + base, k, S, J, n_alpha, R, inner, n, BLOCK, BLOCK_J, BLOCK_R, IS_F64)
    s = tl.load(sigma_ptr)
    if IS_F64:
        acc = acc * s.to(tl.float64)
    else:
        acc = acc * s.to(tl.float32)
    tl.store(out_ptr + k, acc.to(OUT_DTYPE), mask=k < n_alpha)
