"""The RNG contract (design.md section 3): oracle pinned by known answers, every CPU backend
against the oracle, and the statistics of z."""

import numpy as np
import pytest
import torch
from scipy import stats

import pni_fast
from pni_fast.backends.pure_torch import philox_words_torch, randn_torch, uniform_from_words_torch

import kernels
import oracle

SEEDS_OFFSETS = [(0, 0), (1234567, 3), ((1 << 40) + 17, (1 << 33) + 5), ((1 << 63) - 1, (1 << 62) + 9)]


@pytest.mark.parametrize("counter,key,expected", oracle.KNOWN_ANSWERS)
def test_oracle_matches_random123_known_answers(counter, key, expected):
    got = oracle.philox4x32_rounds(*[np.array([c], dtype=np.uint64) for c in counter], *key)[0]
    assert [int(x) for x in got] == list(expected)


def test_oracle_seed_and_counter_split():
    # seed -> (k0 = low, k1 = high); counter -> (c0 = low, c1 = high), c2 = c3 = 0
    seed, ctr = (0xA4093822 << 32) | 0x299F31D0, (0x85A308D3 << 32) | 0x243F6A88
    direct = oracle.philox4x32_rounds([0x243F6A88], [0x85A308D3], [0], [0], 0x299F31D0, 0xA4093822)
    assert (oracle.philox4x32_10(np.array([ctr], dtype=np.uint64), seed) == direct).all()


def test_oracle_element_order():
    w = oracle.words(5, 10, 9)
    assert len(w) == 12
    assert (w[4:8] == oracle.philox4x32_10(np.array([11], dtype=np.uint64), 5)[0]).all()


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_torch_rng_words_and_uniforms_bit_exact(seed, offset):
    n = 1027
    words = philox_words_torch(n, seed, offset).numpy().astype(np.uint32)
    expected = oracle.words(seed, offset, n)
    np.testing.assert_array_equal(words, expected)
    u = uniform_from_words_torch(torch.from_numpy(expected.astype(np.int64))).numpy()
    np.testing.assert_array_equal(u.view(np.uint32), oracle.uniform(expected).view(np.uint32))


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_torch_rng_normals_match_oracle(seed, offset):
    z = randn_torch(4099, seed, offset).numpy()
    np.testing.assert_allclose(z, oracle.normal(seed, offset, 4099), rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", kernels.backend_params("cpu"))
@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_public_randn_matches_oracle(backend, seed, offset):
    n = 257 if backend == "triton" else 5003
    z = pni_fast.randn((n,), seed=seed, offset=offset, backend=backend)
    assert z.dtype == torch.float32 and z.shape == (n,)
    np.testing.assert_allclose(z.numpy(), oracle.normal(seed, offset, n), rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", kernels.backend_params("cpu"))
def test_public_randn_shape_and_offset_continuity(backend):
    """A tensor's noise is the flat stream reshaped; offset k skips exactly 4k elements."""
    z = pni_fast.randn((3, 5, 4), seed=9, offset=0, backend=backend)
    flat = pni_fast.randn((60,), seed=9, offset=0, backend=backend)
    torch.testing.assert_close(z.reshape(-1), flat, rtol=0, atol=0)
    shifted = pni_fast.randn((20,), seed=9, offset=10, backend=backend)
    torch.testing.assert_close(shifted, flat[40:], rtol=0, atol=0)


def test_statistics_of_z():
    z = randn_torch(1 << 20, 2024, 0).double().numpy()
    assert abs(z.mean()) < 5 * (1 / np.sqrt(z.size))
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-3
    # no correlation between neighbours: inside a quad (i, i+1), across quads (i, i+4)
    limit = 5 / np.sqrt(z.size)
    for lag in (1, 2, 3, 4, 5):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < limit, lag
    # consecutive calls (fresh seeds) are independent
    torch.manual_seed(0)
    a = pni_fast.randn((1 << 16,), seed=pni_fast.draw_seed(), backend="torch").double().numpy()
    b = pni_fast.randn((1 << 16,), seed=pni_fast.draw_seed(), backend="torch").double().numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


def test_statistics_catch_a_broken_generator():
    """The checks above are able to fail: a generator that repeats pairs is caught."""
    z = randn_torch(1 << 16, 7, 0).double().numpy()
    broken = np.repeat(z[::2], 2)
    assert abs(np.corrcoef(broken[:-1], broken[1:])[0, 1]) > 5 / np.sqrt(broken.size)


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(123)
    a = [pni_fast.draw_seed() for _ in range(3)]
    torch.manual_seed(123)
    b = [pni_fast.draw_seed() for _ in range(3)]
    assert a == b and len(set(a)) == 3
    assert all(0 <= s < 2**63 for s in a)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(shape=(4,), seed=-1), ValueError, "seed"),
        (dict(shape=(4,), seed=2**63), ValueError, "seed"),
        (dict(shape=(4,), seed=1.5), TypeError, "seed"),
        (dict(shape=(4,), seed=True), TypeError, "seed"),
        (dict(shape=(4,), seed=1, offset=-3), ValueError, "offset"),
        (dict(shape=(-1,), seed=1), ValueError, "shape"),
        (dict(shape=(4,), seed=1, backend="gpu"), ValueError, "backend"),
        (dict(shape=(4,), seed=1, backend="cuda"), RuntimeError, "cuda"),
    ],
)
def test_randn_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pni_fast.randn(**kwargs)


def test_draw_seed_is_torch_randint_with_and_without_the_compiled_draw(monkeypatch):
    """rng.draw_seed (the compiled pni_fast::draw_seed op when loaded, else torch.randint) returns what
    torch.randint(0, 2**63 - 1, ()) returns from the same generator: torch.manual_seed and
    pni_fast.manual_seed decide every layer's seed on both paths."""
    import pni_fast
    from pni_fast import rng

    def expected(gen, n):
        return [int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=gen).item()) for _ in range(n)]

    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(rng, "_draw_op", False)
        torch.manual_seed(3)
        got = [rng.draw_seed() for _ in range(4)]
        torch.manual_seed(3)
        assert got == expected(None, 4)
        pni_fast.manual_seed(4)
        try:
            got = [rng.draw_seed() for _ in range(4)]
        finally:
            pni_fast.manual_seed(None)
        g = torch.Generator()
        g.manual_seed(4)
        assert got == expected(g, 4)
