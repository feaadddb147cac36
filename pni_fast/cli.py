"""Command line: ``python -m pni_fast {demo,train,eval,rng-stream,info,bench}``.

The toolkit's subcommands live in `pni_fast.robust` (``cli_demo``, ``cli_train``, ``cli_eval`` and
``rng_stream`` for ``rng-stream``: each adds its options and runs); this module builds the parser,
runs ``info`` and ``bench`` and dispatches. ``demo`` is the one-command tour (see `pni_fast.robust.cli_demo`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from typing import Optional

import torch

__all__ = ["main", "build_parser"]

# The toolkit's commands (pni_fast.robust) need the `robust` extra (numpy, scikit-learn, tqdm,
# matplotlib); `info` and `bench` need only the core, so a core-only install still runs them.
TOOLKIT_COMMANDS = ("demo", "train", "eval", "rng-stream")
_EXTRA_HINT = "pip install 'pni_fast[robust]'"


def _toolkit():
    """The toolkit's command modules, or the ImportError that says what is missing."""
    try:
        from .robust import cli_demo, cli_eval, cli_train, rng_stream
    except ImportError as e:
        return None, e
    return (cli_demo, cli_train, cli_eval, rng_stream), None


# --------------------------------------------------------------------------- #
# parser
# --------------------------------------------------------------------------- #
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not when the help already names it or the default is None/False
    (a flag), and also for options written without a help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not text or "default" in text or default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return (text + " " if text else "") + "(default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)  # argparse prints nothing for help=None: show the default instead
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pni_fast",
        description=(
            "Parametric Noise Injection (PNI) with fused kernels: demo, training, evaluation, backends, benchmarks."
        ),
        formatter_class=_HelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands, missing = _toolkit()
    if commands is not None:
        for command in commands:
            command.add_parser(sub, _HelpFormatter)
    else:  # listed, so `--help` shows them, and refused in main() with the install hint
        for name in TOOLKIT_COMMANDS:
            stub = sub.add_parser(name, help=f"(needs the robust extra: {_EXTRA_HINT})", add_help=False)
            stub.add_argument("toolkit_args", nargs=argparse.REMAINDER)
    sub.add_parser(
        "info",
        help="show which kernel backends are active and why",
        description="Print pni_fast.info(): compiled extension, CUDA, Triton, fallbacks.",
    )
    b = sub.add_parser(
        "bench",
        help="run the benchmarks (benchmarks/run_all.py of a source checkout)",
        add_help=False,
        description="Run benchmarks/run_all.py from the repository checkout; every argument, -h "
        "included, is passed on (so `bench --help` shows run_all.py's options).",
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/run_all.py")
    return p


# --------------------------------------------------------------------------- #
# commands
# --------------------------------------------------------------------------- #
def run_info(args: argparse.Namespace) -> None:
    from .ops import registry

    print(registry.info())


def _bench_script() -> str:
    """benchmarks/run_all.py of the source checkout this package runs from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "benchmarks", "run_all.py")


def run_bench(args: argparse.Namespace) -> int:
    import runpy

    script = _bench_script()
    if not os.path.isfile(script):
        print(
            f"pni_fast bench: {script} not found. The benchmarks ship with the source repository, not the "
            "installed package: run 'python -m pni_fast bench' from a checkout (or 'python benchmarks/run_all.py').",
            file=sys.stderr,
        )
        return 1
    argv = list(args.bench_args or [])
    if argv and argv[0] == "--":
        argv = argv[1:]
    old = sys.argv
    sys.argv = [script] + argv
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return 0


def _run_toolkit(args: argparse.Namespace) -> None:
    from .robust.cli_demo import run_demo
    from .robust.cli_eval import run_eval
    from .robust.cli_train import run_train
    from .robust.rng_stream import run_rng_stream

    {"demo": run_demo, "train": run_train, "eval": run_eval, "rng-stream": run_rng_stream}[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if args.command in TOOLKIT_COMMANDS:
        _, missing = _toolkit()
        if missing is not None:
            parser.exit(
                2,
                f"{parser.prog} {args.command}: error: this command is part of the robustness toolkit, which "
                f"needs the 'robust' extra ({missing}): {_EXTRA_HINT}\n",
            )
    if args.command == "bench":
        args.bench_args = extra + list(args.bench_args or [])  # options for run_all.py pass through
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    flush = args.command in ("demo", "train", "eval")
    if flush:
        # tiny gradients late in training become subnormal floats, which slow CPU math ~10x
        # (measured: 20 plain digits epochs 13.5 s -> 1.4 s, same accuracy); switched off again on
        # return so a caller in the same process (tests, notebooks) keeps IEEE subnormals
        torch.set_flush_denormal(True)
    try:
        if args.command == "bench":
            return run_bench(args)
        if args.command == "info":
            run_info(args)
        else:
            _run_toolkit(args)
    except (ValueError, OSError, TypeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message
        parser.exit(2, f"{parser.prog} {args.command}: error: {msg}\n")
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return 0
