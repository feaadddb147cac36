"""The noise every Triton kernel draws, and the kernel that stores it (``noise_triton``).

Every kernel draws its noise with ``tl.randn4x(seed, offset + i // 4)`` and interleaves the
four outputs back to element order, so element ``i`` gets output ``i % 4`` of Philox counter
``offset + i // 4`` (design.md section 3): one Philox call per four elements.

``rng_state`` (op contract v2): with the constexpr HAS_STATE the kernels load
``seed = state[0]`` and ``counter base = state[1] + offset`` from device memory (no host sync;
CUDA graphs replay the load), otherwise they use the ``seed`` / ``offset`` arguments.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__: list[str] = []  # the kernels, launched by single_ops / list_ops


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
def rng_key(seed, offset, state_ptr, HAS_STATE: tl.constexpr):
    """(seed, counter base): the arguments, or rng_state[0] and rng_state[1] + offset from memory."""
    if HAS_STATE:
        seed = tl.load(state_ptr)
        offset = tl.load(state_ptr + 1) + offset
    return seed, offset


@triton.jit
def normal_block(seed, offset, start, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
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


@triton.jit(do_not_specialize=["seed", "offset"])
def noise_kernel(
    out_ptr, state_ptr, n, seed, offset, BLOCK: tl.constexpr, HAS_STATE: tl.constexpr, PRECISE: tl.constexpr
):
    """float32 z of n elements."""
    seed, offset = rng_key(seed, offset, state_ptr, HAS_STATE)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    z = normal_block(seed, offset, start, BLOCK, PRECISE)
    tl.store(out_ptr + offs, z, mask=offs < n)
