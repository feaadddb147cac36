"""``python -m pni_fast rng-stream``: the kernels' raw Philox4x32-10 words, for outside test batteries.

The noise of every backend comes from one counter-based stream (docs/design.md section 3): word
``4q + k`` of seed ``S`` at offset ``O`` is word ``k`` of Philox4x32-10 with key ``S`` and counter
``O + q``. This module writes those words as raw little-endian uint32, the input format of
``dieharder -g 200`` (stdin), TestU01's file generators and PractRand's ``RNG_test stdin32``:

- one seed (default): the stream of seed ``S`` from counter ``O`` on, exactly the words that the
  noise of a call with ``(seed=S, offset=O)`` is made of;
- ``seeds=N``: the key-space check. Word ``t`` of the output is word ``t // N`` of seed
  ``S + t % N``, i.e. the first words of N consecutive seeds interleaved, so a battery sees
  neighbouring keys side by side (a weakness there would show as correlated noise between layers or
  steps, whose seeds differ by little).

The words are computed by the compiled library's ``rng_words`` op where it is loaded (one call per seed
and chunk), and otherwise, or for more than 16,384 interleaved seeds (one vectorized pass over all
keys), by the pure-PyTorch Philox of `pni_fast.backends.pure_torch`; both are bit-identical to the contract.
Measured on the project's 2-core AMD EPYC VM: one seed ~200 MB/s, 1,000 interleaved seeds also ~200 MB/s,
the pure-PyTorch path ~5 MB/s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import BinaryIO, Optional

import torch

from ..backends.pure_torch import philox4x32_10_torch
from ..contract import SEED_LIMIT
from .checks import check_int

__all__ = ["stream_words", "write_stream", "add_parser", "run_rng_stream"]

_CHUNK_WORDS = 1 << 20  # 4 MiB per write
_PER_SEED_CALLS_MAX = 1 << 14  # up to this many seeds: one compiled rng_words call per seed and chunk


def _words_one_seed(seed: int, counter: int, n_quads: int) -> torch.Tensor:
    """4 * n_quads words (int64 in [0, 2^32)) of seed ``seed`` from counter ``counter`` on."""
    from .. import _ext

    if _ext.has_op("rng_words", "cpu"):
        w = torch.ops.pni_fast.rng_words(torch.empty(4 * n_quads), seed, counter)
        return w.to(torch.int64) & 0xFFFFFFFF
    counters = torch.arange(n_quads, dtype=torch.int64) + counter
    return philox4x32_10_torch(counters, seed).reshape(-1)


def _words_interleaved(seed: int, n_seeds: int, counter: int, n_quads: int) -> torch.Tensor:
    """Words of counters ``counter .. counter + n_quads - 1`` of seeds ``seed .. seed + n_seeds - 1``, interleaved.

    Output index ``(4 q + k) * n_seeds + i`` holds word ``k`` of counter ``counter + q`` under seed ``seed + i``.
    """
    from .. import _ext

    if n_seeds <= _PER_SEED_CALLS_MAX and _ext.has_op("rng_words", "cpu"):
        like = torch.empty(4 * n_quads)
        per_seed = torch.stack([torch.ops.pni_fast.rng_words(like, seed + i, counter) for i in range(n_seeds)])
        return per_seed.t().reshape(-1).to(torch.int64) & 0xFFFFFFFF  # [n_seeds, 4 n_quads] -> word-major
    keys = torch.arange(n_seeds, dtype=torch.int64).add_(seed).view(1, n_seeds)
    counters = torch.arange(n_quads, dtype=torch.int64).add_(counter).view(n_quads, 1)
    words = philox4x32_10_torch(counters.expand(n_quads, n_seeds), keys)  # [n_quads, n_seeds, 4]
    return words.transpose(1, 2).reshape(-1)


def stream_words(seed: int, offset: int = 0, seeds: int = 1, n_words: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Chunks of the stream (int64 tensors of words in [0, 2^32)); ``n_words`` in all, or without end when None.

    Args:
        seed: the (first) Philox key, in [0, 2^63).
        offset: the first counter, in [0, 2^63).
        seeds: 1 for one seed's stream; N > 1 interleaves the first words of seeds ``seed .. seed + N - 1``.
        n_words: how many words to produce (None: until the counter space ends).
    """
    check_int("seed", seed, 0, SEED_LIMIT - 1)
    check_int("offset", offset, 0, SEED_LIMIT - 1)
    check_int("seeds", seeds, 1)
    if seed + seeds > SEED_LIMIT:
        raise ValueError(f"seed + seeds must be <= 2^63 (Philox keys are < 2^63), got seed={seed}, seeds={seeds}")
    if n_words is not None:
        check_int("n_words", n_words, 0)
    # quads (4 words of one seed) per chunk: at least one, about _CHUNK_WORDS words
    quads_per_chunk = max(1, _CHUNK_WORDS // (4 * seeds))
    counter, left = offset, n_words
    while left is None or left > 0:
        want = quads_per_chunk if left is None else min(quads_per_chunk, -(-left // (4 * seeds)))
        want = min(want, SEED_LIMIT - counter)
        if want <= 0:
            raise ValueError(f"the counter space ends at 2^63: offset={offset} leaves no more words")
        if seeds == 1:
            chunk = _words_one_seed(seed, counter, want)
        else:
            chunk = _words_interleaved(seed, seeds, counter, want)
        if left is not None:
            chunk = chunk[:left]
            left -= chunk.numel()
        counter += want
        yield chunk


def write_stream(out: BinaryIO, seed: int, offset: int = 0, seeds: int = 1, n_bytes: Optional[int] = None) -> int:
    """Write the stream to ``out`` as little-endian uint32; ``n_bytes`` bytes (None: until ``out`` closes).

    Returns the number of bytes written. A closed pipe (the battery has read enough) ends the stream quietly.
    """
    if n_bytes is not None:
        check_int("n_bytes", n_bytes, 0)
    n_words = None if n_bytes is None else -(-n_bytes // 4)
    written = 0
    try:
        for chunk in stream_words(seed, offset, seeds, n_words):
            data = chunk.to(torch.int64).numpy().astype("<u4").tobytes()
            if n_bytes is not None:
                data = data[: n_bytes - written]
            out.write(data)
            written += len(data)
        out.flush()
    except BrokenPipeError:
        return written
    return written


def add_parser(sub, fmt: type) -> None:
    """The ``rng-stream`` subcommand's options."""
    from .checks import cli_int

    r = sub.add_parser(
        "rng-stream",
        formatter_class=fmt,
        help="write the raw Philox words of the noise stream to stdout (for dieharder, TestU01, PractRand)",
        description="Write the kernels' Philox4x32-10 words as raw little-endian uint32 to stdout: one seed's "
        "stream from counter --offset on, or with --seeds N the first words of N consecutive seeds interleaved "
        "(the key-space check). Without --bytes it writes until the reader closes the pipe, e.g. "
        "`python -m pni_fast rng-stream --seed 0 | dieharder -g 200 -a`.",
    )
    r.add_argument("--seed", type=cli_int(0, "an integer in [0, 2^63)"), required=True, help="Philox key (first key)")
    r.add_argument("--offset", type=cli_int(0, "an integer in [0, 2^63)"), default=0, help="first Philox counter")
    r.add_argument(
        "--seeds",
        type=cli_int(1, "a positive integer"),
        default=1,
        help="N > 1: interleave the first words of seeds S .. S+N-1 (word t is word t // N of seed S + t %% N)",
    )
    r.add_argument(
        "--bytes", dest="n_bytes", type=cli_int(0, "an integer >= 0"), default=None, help="stop after B bytes"
    )


def run_rng_stream(args) -> None:
    """Write the stream to stdout; a reader that stops early (``head -c``, a battery) ends it without a traceback."""
    out = sys.stdout.buffer
    want = args.n_bytes
    written = write_stream(out, args.seed, args.offset, args.seeds, want)
    if want is None or written < want:
        # the reader closed the pipe: point stdout at /dev/null so the interpreter's final flush stays quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
