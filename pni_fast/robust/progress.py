"""Progress lines for the long commands (train, eval, demo): one line per finished epoch or attack on
stderr, with the elapsed time and an ETA, whether or not stderr is a terminal (tqdm bars are drawn only on
one; a log file of a CI job or `nohup` still shows that the run is moving)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


def _eta(elapsed: float, done: int, total: int) -> str:
    left = elapsed / max(done, 1) * max(total - done, 0)
    return f"{elapsed:.0f} s elapsed, ETA {left:.0f} s"


def epoch_lines(label: str, epochs: int, first_epoch: int = 0) -> Callable[[dict[str, Any]], None]:
    """``train(..., on_epoch=...)``: ``[label] epoch 3/20: loss 0.412, test 97.2% (31 s elapsed, ETA 175 s)``."""
    t0 = time.perf_counter()

    def report(record: dict[str, Any]) -> None:
        done = int(record["epoch"]) - first_epoch
        test = record.get("test_clean_acc")
        adv = record.get("test_adv_acc")
        parts = [f"loss {record['train_loss']:.3f}"]
        if test is not None:
            parts.append(f"test {100 * test:.1f}%")
        if adv is not None:
            parts.append(f"test adv {100 * adv:.1f}%")
        timing = _eta(time.perf_counter() - t0, done, epochs - first_epoch)
        print(f"[{label}] epoch {record['epoch']}/{epochs}: {', '.join(parts)} ({timing})", file=sys.stderr, flush=True)

    return report


def attack_lines(label: str) -> Callable[[Any, int, int], None]:
    """``evaluate(..., on_attack=...)``: ``[label] PGD-10: 62.9% (2/5 attacks, 40 s elapsed, ETA 60 s)``."""
    t0 = time.perf_counter()

    def report(result: Any, i: int, total: int) -> None:
        timing = _eta(time.perf_counter() - t0, i + 1, total)
        print(
            f"[{label}] {result.attack}: {100 * result.mean:.1f}% ({i + 1}/{total} attacks, {timing})",
            file=sys.stderr,
            flush=True,
        )

    return report
