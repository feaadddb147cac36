"""The RNG contract (design.md section 3) on every backend's kernels against the numpy oracle.

Words and uniforms are bit-exact (the compiled library's rng_words / rng_uniform), z is within
Z_TOL = 2e-6 of the oracle; under the Triton interpreter z comes from tl.randn4x evaluated in
numpy float32 like the oracle, so there it must be bit-equal. One body per check, parametrized
by backend (tests/support/kernels.py).

The noise against the oracle runs chosen cases (NOISE_CASES: seed, offset, n), not a cross product:

=======================================  ===================================================
behaviour                                case(s)
=======================================  ===================================================
key: 0, i32, u32 (Triton types ints by   seed0-offset0-n1, i32seed-oddoffset-n5,
value), high word set, 2^63 - 1          u32seed-u32offset-n3, highkey-crossing-2^32-n257,
                                         i64seed-oddoffset-n1023, maxseed-*
counter: 0, odd, u32, i64 (high word)    seed0-*, *-oddoffset-*, u32seed-u32offset-n3,
                                         maxseed-i64offset-n4099
counters crossing 2^31 (i32 offset +     i32offset-crossing-2^31-n1025
block index) and 2^32 (c0 -> c1)         highkey-crossing-2^32-n257, maxseed-u32offset-*
near the 2^63 counter limit              empty-at-last-offset; test_noise_near_the_counter_limit
n = 0, 1, 3, 5 (quad tails)              empty-at-last-offset, n1, n3, n5
block edges: quad (2, 4), CPU block      test_noise_matches_oracle_at_block_edges (2, 4, 255,
(255/256/257), Triton / CUDA block       256, 1024, 2048); n257, n1023, n1025, n2051, n4099
(1023/1024/1025), several blocks         in NOISE_CASES
=======================================  ===================================================
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
import oracle
from kernels import OFFSET, SEED, check_noise

# ---------------------------------------------------------------------------
# words and uniforms (compiled library)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1])
@pytest.mark.parametrize("offset", [0, 7, 2**32 - 3, 2**40, 2**62])
def test_words_and_uniforms_bit_exact(cpp_kernel, seed, offset):
    n = 1001
    like = torch.empty(n, device=cpp_kernel.device)
    words = torch.ops.pni_fast.rng_words(like, seed, offset)
    assert words.dtype == torch.int32 and words.shape == (1004,)
    expected = oracle.words(seed, offset, n)
    np.testing.assert_array_equal(words.cpu().numpy().view(np.uint32), expected)
    uni = torch.ops.pni_fast.rng_uniform(like, seed, offset)
    assert uni.dtype == torch.float32
    np.testing.assert_array_equal(uni.cpu().numpy(), oracle.uniform(expected))


@pytest.mark.parametrize("numel", [1, 5, 4096, 10_001])
def test_words_and_uniforms_sizes(cpp_kernel, numel):
    like = torch.empty(numel, device=cpp_kernel.device)
    words = torch.ops.pni_fast.rng_words(like, SEED, OFFSET).cpu().numpy().view(np.uint32)
    np.testing.assert_array_equal(words, oracle.words(SEED, OFFSET, numel))
    uni = torch.ops.pni_fast.rng_uniform(like, SEED, OFFSET).cpu().numpy()
    np.testing.assert_array_equal(uni, oracle.uniform(oracle.words(SEED, OFFSET, numel)))


def test_words_known_answer_zero_counter(cpp_kernel):
    # Random123 kat_vectors philox4x32_10: counter 0, key 0
    w = torch.ops.pni_fast.rng_words(torch.empty(4, device=cpp_kernel.device), 0, 0).cpu().numpy().view(np.uint32)
    assert [hex(x) for x in w] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


# ---------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------


# (seed, offset, n): every key and counter behaviour once, each at another size (tails, block edges).
# Triton types an int argument by its value (i32, u32 in [2^31, 2^32), i64), the others split seed and
# counter into 32-bit Philox words.
NOISE_CASES = [
    pytest.param(0, 0, 1, id="seed0-offset0-n1"),  # zero key and counter, one element
    pytest.param(987654321, 3, 5, id="i32seed-oddoffset-n5"),  # a quad and one element
    pytest.param(2**31 + 5, 2**31 + 1, 3, id="u32seed-u32offset-n3"),  # less than a quad
    pytest.param(5, 2**31 - 2, 1025, id="i32offset-crossing-2^31-n1025"),  # i32 offset + block index
    pytest.param(2**33 + 17, 2**32 - 10, 257, id="highkey-crossing-2^32-n257"),  # c0 carries into c1
    pytest.param(0x1234_5678_9ABC, 37, 1023, id="i64seed-oddoffset-n1023"),
    pytest.param(2**63 - 1, 2**32 - 3, 2051, id="maxseed-u32offset-crossing-2^32-n2051"),
    pytest.param(2**63 - 1, 2**62, 4099, id="maxseed-i64offset-n4099"),  # high counter word set
    pytest.param(1, 2**63 - 1, 0, id="empty-at-last-offset"),  # accepted: no counter is drawn
]


@pytest.mark.parametrize("seed,offset,n", NOISE_CASES)
def test_noise_matches_oracle(kernel, seed, offset, n):
    z = kernel.noise(torch.empty(n, dtype=torch.float16, device=kernel.device), seed, offset)
    assert z.shape == (n,) and z.device.type == kernel.device
    check_noise(kernel, z, seed, offset)


# sizes at the edges of a quad (n % 4: 2, 0), of a CPU block (256 elements), of a Triton block and a CUDA
# thread block (1024); the sizes just past them are in NOISE_CASES
@pytest.mark.parametrize("numel", [2, 4, 255, 256, 1024, 2048])
def test_noise_matches_oracle_at_block_edges(kernel, numel):
    z = kernel.noise(torch.empty(numel, device=kernel.device), SEED, OFFSET)
    assert z.shape == (numel,)
    check_noise(kernel, z, SEED, OFFSET)


def test_noise_shape_dtype_and_empty(kernel):
    dev = kernel.device
    z = kernel.noise(torch.empty(3, 0, 5, dtype=torch.float16, device=dev), 1, 0)
    assert z.shape == (3, 0, 5) and z.dtype == torch.float32
    z = kernel.noise(torch.empty(2, 3, 5, dtype=torch.bfloat16, device=dev), 1, 0)
    assert z.shape == (2, 3, 5) and z.dtype == torch.float32 and z.is_contiguous()


def test_noise_keeps_shape_and_is_prefix_consistent(kernel):
    dev = kernel.device
    z = kernel.noise(torch.empty(6, 7, 5, device=dev), 42, 9)
    assert z.shape == (6, 7, 5) and z.is_contiguous()
    flat = kernel.noise(torch.empty(1000, device=dev), 42, 9)
    # element i depends only on (seed, offset, i): a shorter tensor is a prefix
    assert torch.equal(z.reshape(-1), flat[:210])
    # offset advances by counters: element 4k of offset o+1 is element 4k+4 of offset o
    assert torch.equal(kernel.noise(torch.empty(996, device=dev), 42, 10), flat[4:])
    # a later window of a multi-block tensor equals a shifted offset
    full = kernel.noise(torch.empty(2048, device=dev), 9, 100)
    assert torch.equal(full[1024:], kernel.noise(torch.empty(1024, device=dev), 9, 100 + 256))


def test_noise_statistics(kernel):
    # the interpreter is slow: 2^14 samples there (standard errors ~0.008), 2^18 elsewhere (~0.002)
    n, tol = (1 << 14, 0.05) if kernel.interpreted else (1 << 18, 0.01)
    z = kernel.noise(torch.empty(n, device=kernel.device), 2024, 0).double().cpu()
    assert abs(z.mean().item()) < tol
    assert abs(z.var().item() - 1) < tol
    # no correlation between neighbours inside a quad and across quads
    for lag in (1, 2, 3, 4, 5):
        c = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(c) < tol, (lag, c)
    assert abs(torch.corrcoef(torch.stack([z[0::2], z[1::2]]))[0, 1].item()) < tol


def test_noise_near_the_counter_limit(kernel):
    """offset + ceil(numel / 4) < 2**63: the last counter, 2**63 - 2, is still drawn correctly."""
    like = torch.empty(8, device=kernel.device)  # 2 counters
    check_noise(kernel, kernel.noise(like, 3, 2**63 - 3), 3, 2**63 - 3)


@pytest.mark.parametrize("op", ["noise", "rng_words", "rng_uniform"])
def test_rng_state_replaces_seed_and_adds_base(kernel, op):
    """rng_state = (seed, base): the seed argument is ignored, counters start at base + offset, the
    state is never written."""
    if op != "noise" and kernel.name not in kernels.CPP:
        pytest.skip(f"{op} is an op of the compiled library only")
    fn = kernel.noise if op == "noise" else getattr(torch.ops.pni_fast, op)
    like = torch.empty(1001, device=kernel.device)
    seed, base = 2**40 + 7, 2**32 + 3
    state = torch.tensor([seed, base], device=kernel.device)
    got = fn(like, 0, 5, state)
    assert torch.equal(got, fn(like, seed, base + 5))
    assert torch.equal(got, fn(like, 999, 5, rng_state=state))  # the seed argument is ignored
    assert state.tolist() == [seed, base]  # never written
    if op == "rng_words":
        np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), oracle.words(seed, base + 5, 1001))
    if op == "noise":
        check_noise(kernel, got, seed, base + 5)
