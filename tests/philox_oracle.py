"""Independent numpy implementation of the pni_fast RNG contract (design.md section 3).

It shares no code with the package: every backend is checked against it, and it is
itself pinned by Random123's published known-answer vectors for philox4x32_10.
"""
from __future__ import annotations

import numpy as np

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_rounds(c0, c1, c2, c3, k0, k1, rounds: int = 10) -> np.ndarray:
    """Random123 philox4x32 on uint64 arrays holding 32-bit values; returns (n, 4) uint32."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in (c0, c1, c2, c3))
    k0 = np.uint64(int(k0) & 0xFFFFFFFF)
    k1 = np.uint64(int(k1) & 0xFFFFFFFF)
    for _ in range(rounds):
        p0 = _M0 * c0  # < 2^64: exact in uint64
        p1 = _M1 * c2
        n0 = (p1 >> _SHIFT32) ^ c1 ^ k0
        n1 = p1 & _MASK32
        n2 = (p0 >> _SHIFT32) ^ c3 ^ k1
        n3 = p0 & _MASK32
        c0, c1, c2, c3 = n0, n1, n2, n3
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def philox4x32_10(counters: np.ndarray, seed: int) -> np.ndarray:
    """Philox words for 64-bit counters (c0 = low, c1 = high, c2 = c3 = 0) under a 63-bit seed."""
    ctr = np.asarray(counters, dtype=np.uint64)
    zero = np.zeros_like(ctr)
    return philox4x32_rounds(ctr & _MASK32, ctr >> _SHIFT32, zero, zero, seed & 0xFFFFFFFF, seed >> 32)


def words(seed: int, offset: int, numel: int) -> np.ndarray:
    """Flat uint32 words in element order: element i takes word i % 4 of counter offset + i // 4."""
    nq = -(-numel // 4)
    ctr = np.uint64(offset) + np.arange(nq, dtype=np.uint64)
    return philox4x32_10(ctr, seed).reshape(-1)


def uniform(w: np.ndarray) -> np.ndarray:
    """The contract's word -> float32 map: int32 view, negative values complemented, times 0x2FFFFFFF."""
    v = np.asarray(w, dtype=np.uint32).view(np.int32)
    v = np.where(v < 0, ~v, v)
    return v.astype(np.float32) * np.float32(4.6566127342e-10)


def normal_from_words(w: np.ndarray) -> np.ndarray:
    """fp32 Box-Muller on pairs (w0, w1) and (w2, w3) of each quad."""
    u = uniform(w).reshape(-1, 2, 2)
    u1 = np.maximum(np.float32(1e-7), u[:, :, 0])
    u2 = u[:, :, 1]
    with np.errstate(all="ignore"):
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
    t = np.float32(6.2831855) * u2
    z = np.stack([r * np.cos(t), r * np.sin(t)], axis=-1)
    return z.astype(np.float32).reshape(-1)


def normal(seed: int, offset: int, numel: int) -> np.ndarray:
    """z for a tensor of `numel` elements: what every backend must produce (within 2e-6)."""
    return normal_from_words(words(seed, offset, numel))[:numel]


# Random123 kat_vectors, philox4x32_10: (counter c0..c3, key k0..k1) -> output words.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
