"""Tight timing loops for per-call costs of a few microseconds, and interleaved side-by-side rounds.

``torch.utils.benchmark`` adds its own per-block bookkeeping, which is fine for milliseconds but
blurs a 5 us call; here a block is a bare ``for`` loop of ``n`` calls between two
``time.perf_counter`` reads (garbage collection paused, the device synchronised at the end of the
block on GPU), and a measurement is the median over blocks.

Every block is timed on two clocks: wall time (``perf_counter``, what a user waits) and CPU time
of this process (``time.process_time``: all its threads; the calling thread only with
``clock="thread"``). On a shared machine whose other jobs take the cores away, wall time grows by
the time spent waiting for a core while CPU time stays close to the idle-machine cost, so the CPU
figures are the load-robust complement (GPU work is not in them).

Side-by-side comparisons (``interleaved``) time every candidate once per round, in an order
rotated each round, so a load drift on a shared machine hits all candidates alike; ratios are
taken within a round and the median over rounds is reported.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

__all__ = ["block_seconds", "block_times", "calibrate", "per_call", "interleaved", "summarize", "ratio_summary"]

CLOCKS = {"thread": time.thread_time, "process": time.process_time}


def _noop() -> None:
    return None


def block_times(
    fn: Callable[[], Any], n: int, sync: Callable[[], None] = _noop, clock: str = "process"
) -> tuple[float, float]:
    """``(wall, cpu)`` seconds per call of ``fn`` over one block of ``n`` back-to-back calls."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cpu_clock = CLOCKS[clock]
    enabled = gc.isenabled()
    gc.disable()
    try:
        sync()
        c0, t0 = cpu_clock(), time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        t1, c1 = time.perf_counter(), cpu_clock()
        return (t1 - t0) / n, (c1 - c0) / n
    finally:
        if enabled:
            gc.enable()


def block_seconds(fn: Callable[[], Any], n: int, sync: Callable[[], None] = _noop) -> float:
    """Wall seconds per call of ``fn`` over one block of ``n`` back-to-back calls."""
    return block_times(fn, n, sync)[0]


def calibrate(fn: Callable[[], Any], target_s: float, sync: Callable[[], None] = _noop, max_n: int = 1_000_000) -> int:
    """Calls per block so that one block lasts about ``target_s`` (at least 1); warms ``fn`` up."""
    fn()
    n = 1
    while True:
        t = block_seconds(fn, n, sync) * n
        if t >= target_s / 4 or n >= max_n:
            break
        n *= 4
    per = t / n
    return max(1, min(max_n, round(target_s / per) if per > 0 else max_n))


def per_call(
    fn: Callable[[], Any],
    *,
    blocks: int = 7,
    target_s: float = 0.02,
    sync: Callable[[], None] = _noop,
    clock: str = "process",
) -> dict[str, Any]:
    """Median / min / 20-80 % quantiles of wall time per call over ``blocks`` blocks, in microseconds,
    and the median / min CPU time (``cpu_median_us``, ``cpu_min_us``)."""
    n = calibrate(fn, target_s, sync)
    pairs = [block_times(fn, n, sync, clock) for _ in range(blocks)]
    out = summarize([w for w, _ in pairs], n, scale=1e6, unit="us")
    cpu = [c * 1e6 for _, c in pairs]
    out.update(cpu_median_us=statistics.median(cpu), cpu_min_us=min(cpu), cpu_clock=clock)
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(list(values), dtype=torch.float64), q))


def summarize(times: Sequence[float], n: int, *, scale: float, unit: str) -> dict[str, Any]:
    """Per-call statistics of block times (seconds per call) scaled to ``unit``."""
    vals = [t * scale for t in times]
    return {
        f"median_{unit}": statistics.median(vals),
        f"q20_{unit}": _quantile(vals, 0.2),
        f"q80_{unit}": _quantile(vals, 0.8),
        f"min_{unit}": min(vals),
        "blocks": len(vals),
        "calls_per_block": n,
    }


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    target_s: float,
    sync: Callable[[], None] = _noop,
    setup: Optional[dict[str, Callable[[], None]]] = None,
    log: Optional[Callable[[str], None]] = None,
    clock: str = "process",
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Time every ``fns`` entry once per round (rotated order).

    Returns per-round wall seconds per call, per-round CPU seconds per call, and calls per block.

    ``setup[name]`` (optional) runs before that entry's block in every round, outside the timing
    (e.g. to set the thread count or a backend).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    setup = setup or {}
    ns: dict[str, int] = {}
    for name in names:  # warm-up and calibration, in the same conditions as the timed blocks
        setup.get(name, _noop)()
        ns[name] = calibrate(fns[name], target_s, sync)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            setup.get(name, _noop)()
            wall, c = block_times(fns[name], ns[name], sync, clock)
            times[name].append(wall)
            cpu[name].append(c)
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.3f} ms" for k in names))
    return times, cpu, ns


def ratio_summary(base: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """Per-round ``base / other`` (> 1: ``other`` is faster): median, min and max over rounds."""
    ratios = [b / o for b, o in zip(base, other)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
