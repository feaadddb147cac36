"""Argument checks of the robustness toolkit: numbers and choices, one rule and one message each.

Attacks, `AttackSpec`, `evaluate`, `TrainConfig`, the batch iterators and the command line all
validate through these functions, so a bad ``steps`` reads the same wherever it is passed. A value
of the wrong type raises `WrongTypeError`, which is both a TypeError and a ValueError: callers
that caught either before still catch it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

__all__ = [
    "WrongTypeError",
    "check_int",
    "check_real",
    "check_choice",
    "check_bool",
    "cli_int",
    "cli_fraction",
    "cli_positive_fraction",
]


class WrongTypeError(TypeError, ValueError):
    """An argument of the wrong type (a TypeError that ``except ValueError`` also catches)."""


def check_int(name: str, value: Any, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; bools and floats are refused."""
    rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongTypeError(f"{name} must be an int {rng}, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {rng}, got {value!r}")
    return value


def check_real(name: str, value: Any, *, positive: bool = False, maximum: Optional[float] = None) -> float:
    """``value`` as a finite float ``>= 0`` (``> 0`` when ``positive``; at most ``maximum`` if given)."""
    rng = "> 0" if positive else ">= 0"
    if maximum is not None:
        rng = f"in {'(' if positive else '['}0, {maximum:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WrongTypeError(f"{name} must be a finite number {rng}, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise WrongTypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


# --------------------------------------------------------------------------- #
# argparse types: the same rules for command-line strings
# --------------------------------------------------------------------------- #
def cli_int(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the error)."""

    def parse(s: str) -> int:
        try:
            return check_int("value", int(s), minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None

    return parse


def _number(s: str) -> float:
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number like 0.03 or 8/255, got {s!r}") from None


def cli_fraction(s: str) -> float:
    """An argparse type: a finite number >= 0; accepts 8/255 style fractions."""
    try:
        return check_real("value", _number(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}") from None


def cli_positive_fraction(s: str) -> float:
    """An argparse type: a finite number > 0; accepts 8/255 style fractions."""
    try:
        return check_real("value", _number(s), positive=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}") from None
