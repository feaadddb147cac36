"""``python -m pni_fast rng-stream``: the raw Philox words for outside batteries, checked against the numpy oracle.

The slow test pipes a short dieharder battery through both modes (one seed, interleaved seeds); it skips
with the reason when dieharder is not installed (``apt-get install dieharder``).
"""

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pni_fast.cli import main
from pni_fast.robust import rng_stream

import oracle
from repo import ROOT

KNOWN_SEED0 = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]  # Random123 philox4x32_10, key 0, counter 0


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pni_fast", "rng-stream", *args], cwd=ROOT, capture_output=True, timeout=120, **kw
    )


def _stream(seed, offset=0, seeds=1, n_bytes=None) -> np.ndarray:
    buf = io.BytesIO()
    assert rng_stream.write_stream(buf, seed, offset, seeds, n_bytes) == n_bytes
    return np.frombuffer(buf.getvalue(), dtype="<u4")


def _interleaved_oracle(seed, offset, n_seeds, n_words) -> np.ndarray:
    per_seed = -(-n_words // n_seeds)
    cols = np.stack([oracle.words(seed + i, offset, per_seed) for i in range(n_seeds)], axis=1)  # [t, seed]
    return cols.reshape(-1)[:n_words]


def test_cli_first_words_known_answer():
    r = _cli("--seed", "0", "--bytes", "16")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"".join(w.to_bytes(4, "little") for w in KNOWN_SEED0)
    assert list(np.frombuffer(r.stdout, dtype="<u4")) == KNOWN_SEED0


def test_cli_interleaved_and_offset_match_oracle(capsysbinary):
    assert main(["rng-stream", "--seed", "5", "--offset", "7", "--seeds", "3", "--bytes", "96"]) == 0
    out = capsysbinary.readouterr().out
    np.testing.assert_array_equal(np.frombuffer(out, dtype="<u4"), _interleaved_oracle(5, 7, 3, 24))


@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), (2**32 + 1, 2**40), (2**63 - 1, 2**62)])
def test_one_seed_matches_oracle(seed, offset):
    np.testing.assert_array_equal(_stream(seed, offset, 1, 4 * 1001), oracle.words(seed, offset, 1001)[:1001])


def test_byte_count_not_a_multiple_of_four():
    full = oracle.words(9, 0, 11).astype("<u4").tobytes()
    buf = io.BytesIO()
    assert rng_stream.write_stream(buf, 9, 0, 1, 43) == 43
    assert buf.getvalue() == full[:43]


@pytest.mark.parametrize("per_seed_calls", [True, False], ids=["compiled", "vectorized"])
@pytest.mark.parametrize("n_seeds", [2, 5])
def test_interleaved_matches_oracle(monkeypatch, per_seed_calls, n_seeds):
    """Word t is word t // N of seed S + t % N, on both routes (one compiled call per seed; one torch pass)."""
    if not per_seed_calls:
        monkeypatch.setattr(rng_stream, "_PER_SEED_CALLS_MAX", 0)
    n = 4 * 7 * n_seeds + 2
    np.testing.assert_array_equal(_stream(100, 11, n_seeds, 4 * n), _interleaved_oracle(100, 11, n_seeds, n))


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_chunks_continue_the_stream(monkeypatch, n_seeds):
    """Small chunks give the same words as one big one (the counter advances exactly across chunks)."""
    monkeypatch.setattr(rng_stream, "_CHUNK_WORDS", 8)
    chunks = list(rng_stream.stream_words(3, 2**32 - 2, n_seeds, 101))
    assert len(chunks) > 3
    got = np.concatenate([c.numpy() for c in chunks]).astype(np.uint32)
    np.testing.assert_array_equal(got, _interleaved_oracle(3, 2**32 - 2, n_seeds, 101))


def test_neighbouring_seeds_differ():
    w = _stream(0, 0, 4, 4 * 4 * 64).reshape(-1, 4)  # column i: seed i
    for i in range(3):
        assert (w[:, i] != w[:, i + 1]).mean() > 0.99


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(seed=2**63 - 1, seeds=2), "seed \\+ seeds"),
        (dict(seed=-1), "seed must be"),
        (dict(seed=0, seeds=0), "seeds must be"),
        (dict(seed=0, offset=2**63), "offset must be"),
    ],
)
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        next(rng_stream.stream_words(**kwargs))


def test_cli_bad_seed_is_one_line_error(capsysbinary):
    with pytest.raises(SystemExit) as e:
        main(["rng-stream", "--seed", str(2**63 - 1), "--seeds", "2", "--bytes", "4"])
    out, err = capsysbinary.readouterr()
    assert e.value.code == 2 and out == b""
    assert "seed + seeds" in err.decode() and len(err.decode().strip().splitlines()) == 1


def test_cli_reader_closing_early_is_quiet():
    """Without --bytes the stream runs until the reader stops: no traceback, exit 0."""
    p = subprocess.Popen(
        [sys.executable, "-m", "pni_fast", "rng-stream", "--seed", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = p.stdout.read(64)
    p.stdout.close()
    rc = p.wait(timeout=60)
    err = p.stderr.read().decode()
    p.stderr.close()
    np.testing.assert_array_equal(np.frombuffer(head, dtype="<u4"), oracle.words(1, 0, 16))
    assert rc == 0 and "Traceback" not in err and "Exception" not in err, err


# --------------------------------------------------------------------------- #
# slow tier: a short dieharder battery on both modes
# --------------------------------------------------------------------------- #
# diehard_birthdays, diehard_rank_6x8, diehard_count_1s_str, diehard_parking_lot, diehard_runs: ~25 s per mode
SHORT_BATTERY = (0, 3, 8, 10, 15)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [("--seed", "0"), ("--seed", "0", "--seeds", "1024")], ids=["one-seed", "seeds-1024"])
def test_dieharder_short_battery(mode):
    exe = shutil.which("dieharder")
    if exe is None:
        pytest.skip("dieharder is not installed (Debian: apt-get install dieharder); docs/evaluation.md has results")
    for test_id in SHORT_BATTERY:
        src = subprocess.Popen(
            [sys.executable, "-m", "pni_fast", "rng-stream", *mode], cwd=ROOT, stdout=subprocess.PIPE
        )
        try:
            r = subprocess.run(
                [exe, "-g", "200", "-d", str(test_id)], stdin=src.stdout, capture_output=True, timeout=300
            )
        finally:
            src.stdout.close()
            src.wait(timeout=60)
        out = r.stdout.decode()
        rows = [
            line
            for line in out.splitlines()
            if "|" in line and ("PASSED" in line or "WEAK" in line or "FAILED" in line)
        ]
        assert rows, out
        assert not any("FAILED" in line for line in rows), out
