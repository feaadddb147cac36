"""Per-call fixed cost of ``pni_fast.noisy_weight`` on small weights, against the original PNI math.

Small CNN layers (a 16x3x3x3 conv has 432 elements) make the op's cost a fixed per-call cost:
argument checks, backend choice, sigma, seed draw, the dispatcher, autograd. This benchmark

1. times ``pni_fast.noisy_weight(w, alpha)`` and ``pni_fast.reference.reference_noisy_weight``
   (the original code: ``std().item()`` + a stored ``normal_`` noise tensor) side by side in one
   process, forward and forward+backward, interleaved in rounds; the ratio is
   reference time / pni_fast time per round (>= 1.0x: pni_fast is faster), median of rounds;
2. breaks pni_fast's forward into its pieces, each timed alone in a tight loop (the same calls the
   public function makes, with the same arguments): argument checks, backend resolve, sigma, finite
   check, seed draw, the raw op, the autograd wrapper (``autograd.apply(PerturbFn, ...)`` minus the
   raw op); "rest" is the total minus the pieces (Python glue between them). The backward is split
   into the raw alpha-gradient op and the rest (autograd engine), and the reference's forward into
   ``std().item()``, the ``normal_`` draw and the autograd-recorded combine.

Layerwise alpha (one element), fp32, weights and alpha requiring grad as in training.

This file holds the side-by-side run and the command line; the pieces of the breakdown are in
``fixed_cost_pieces.py`` and the report in ``fixed_cost_report.py`` (``PIECES``, ``markdown`` and
``write_outputs`` are re-exported here, where ``run_all.py`` and the tests use them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, loops  # noqa: E402
from benchmarks.fixed_cost_pieces import PIECES, breakdown, piece_fns  # noqa: E402
from benchmarks.fixed_cost_report import markdown, write_outputs  # noqa: E402
from benchmarks.ops_cases import weight_shape  # noqa: E402

__all__ = ["SIZES", "fixed_shape", "run", "markdown", "write_outputs", "add_arguments", "options", "main"]

SIZES = (432, 2304, 9216, 36864)
QUICK_SIZES = (432,)
# Real conv weight shapes: CIFAR ResNet's stem (16x3x3x3) and its three stages' 3x3 convs.
SHAPES = {432: (16, 3, 3, 3), 2304: (16, 16, 3, 3), 9216: (32, 32, 3, 3), 36864: (64, 64, 3, 3)}
MODES = ("forward", "fwd_bwd")


def fixed_shape(numel: int) -> tuple[int, ...]:
    """The conv shape of a benchmark size (other sizes: ``ops_cases.weight_shape``)."""
    if numel in SHAPES:
        return SHAPES[numel]
    return weight_shape(numel)


def _sync_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _inputs(numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(numel)
    w = (torch.randn(fixed_shape(numel), generator=gen) * 0.1).to(device).requires_grad_(True)
    a = torch.full((1,), 0.25, device=device, requires_grad=True)
    g = torch.randn(w.shape, generator=gen).to(device)
    return w, a, g


def _public_fns(w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> dict[str, dict[str, Callable[[], Any]]]:
    import pni_fast
    from pni_fast.reference import reference_noisy_weight

    def fwd_bwd(f: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(f(w, a), (w, a), g)

    return {
        "forward": {"pni_fast": lambda: pni_fast.noisy_weight(w, a), "reference": lambda: reference_noisy_weight(w, a)},
        "fwd_bwd": {"pni_fast": fwd_bwd(pni_fast.noisy_weight), "reference": fwd_bwd(reference_noisy_weight)},
    }


def run(
    device: torch.device,
    *,
    sizes: tuple[int, ...] = SIZES,
    rounds: int = 9,
    target_s: float = 0.02,
    blocks: int = 7,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Side-by-side ratios and the per-piece breakdown at every size; returns ``(meta, records)``."""
    env = common.environment(device)
    meta = dict(
        env,
        benchmark="fixed_cost",
        sizes=list(sizes),
        rounds=rounds,
        block_target_s=target_s,
        breakdown_blocks=blocks,
        alpha="layerwise",
        dtype="fp32",
        ratio="reference time / pni_fast time per round, median of rounds (>= 1: pni_fast faster)",
    )
    base = {k: env[k] for k in ("device", "device_slug", "torch", "threads")}
    sync = _sync_for(device)
    records: list[dict[str, Any]] = []
    for numel in sizes:
        w, a, g = _inputs(numel, device)
        shape = list(w.shape)
        for mode, fns in _public_fns(w, a, g).items():
            rec: dict[str, Any] = dict(base, kind="compare", numel=numel, shape=shape, mode=mode)
            try:
                times, cpu, ns = loops.interleaved(fns, rounds=rounds, target_s=target_s, sync=sync)
                ratio = loops.ratio_summary(times["reference"], times["pni_fast"])
                cpu_ratio = loops.ratio_summary(cpu["reference"], cpu["pni_fast"])
                for name in fns:
                    rec[f"{name}_us"] = statistics.median(times[name]) * 1e6
                    rec[f"{name}_cpu_us"] = statistics.median(cpu[name]) * 1e6
                    rec[f"{name}_rounds_us"] = [t * 1e6 for t in times[name]]
                    rec[f"{name}_rounds_cpu_us"] = [t * 1e6 for t in cpu[name]]
                    rec[f"{name}_calls_per_block"] = ns[name]
                rec.update(
                    status="ok",
                    ratio=ratio["median"],
                    ratio_min=ratio["min"],
                    ratio_max=ratio["max"],
                    cpu_ratio=cpu_ratio["median"],
                    cpu_ratio_min=cpu_ratio["min"],
                    cpu_ratio_max=cpu_ratio["max"],
                )
                log(
                    f"[fixed] {numel:>6} {mode:<8} pni_fast {rec['pni_fast_us']:8.2f} us  reference "
                    f"{rec['reference_us']:8.2f} us  ratio {rec['ratio']:.2f}x (CPU time: {rec['pni_fast_cpu_us']:.2f} "
                    f"vs {rec['reference_cpu_us']:.2f} us, {rec['cpu_ratio']:.2f}x)"
                )
            except Exception as exc:  # reported, not hidden
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
                log(f"[fixed] {numel} {mode}: {rec['reason']}")
            records.append(rec)
        try:
            fns, backend = piece_fns(w, a, g)
            pieces = breakdown(fns, blocks, target_s, sync)
            for group, piece, code in PIECES:
                stats = pieces[(group, piece)]
                records.append(
                    dict(
                        base,
                        kind="breakdown",
                        numel=numel,
                        shape=shape,
                        group=group,
                        piece=piece,
                        code=code,
                        backend=backend,
                        status="ok",
                        **stats,
                    )
                )
            f = pieces[("pni_fast", "forward total")]
            log(
                f"[fixed] {numel:>6} breakdown: pni_fast forward {f['median_us']:.2f} us wall, "
                f"{f['cpu_median_us']:.2f} us CPU, backend {backend}"
            )
        except Exception as exc:
            records.append(
                dict(
                    base,
                    kind="breakdown",
                    numel=numel,
                    shape=shape,
                    status="error",
                    reason=f"{type(exc).__name__}: {exc}"[:300],
                )
            )
            log(f"[fixed] {numel} breakdown: {records[-1]['reason']}")
    meta["load_avg_end_1_5_15"] = common.load_average()
    return meta, records


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(float(x)) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fixed-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"--fixed-sizes must be >= 2 elements each, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fixed-sizes",
        type=_sizes,
        default=None,
        help="weight sizes for the fixed-cost benchmark (default 432,2304,9216,36864; 432 with --quick)",
    )
    p.add_argument("--fixed-rounds", type=int, default=None, help="side-by-side rounds (default 9; 2 with --quick)")


def options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rounds = args.fixed_rounds or (2 if args.quick else 9)
    if rounds < 1:
        raise ValueError(f"--fixed-rounds must be >= 1, got {rounds}")
    return dict(
        sizes=args.fixed_sizes or (QUICK_SIZES if args.quick else SIZES),
        rounds=rounds,
        target_s=0.002 if args.quick else 0.02,
        blocks=2 if args.quick else 7,
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0], "432 elements, 2 rounds, short blocks: proves the script works")
    add_arguments(p)
    args = p.parse_args(argv)
    device, out = common.setup_run(args)
    meta, records = run(device, **options(args, device))
    write_outputs(out, meta, records, "python benchmarks/bench_fixed_cost.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out}/fixed_cost.json and fixed_cost.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
