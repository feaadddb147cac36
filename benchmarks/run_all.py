"""Run every benchmark at its default size and write results under benchmarks/results/<device>/.

``python benchmarks/run_all.py``          everything (several minutes on 2 CPU cores)
``python benchmarks/run_all.py --quick``  tiny sizes, seconds: proves the scripts work (CI); writes to
                                          benchmarks/results/quick/<device>/ (git-ignored) unless --out
``python benchmarks/run_all.py --full``   every size x alpha mode x dtype x pass in the op sweep (long)

Parts, each in its own file, each writing ``<part>.json`` (one record per measurement, naming device,
versions, date, threads and load) and ``<part>.md``; ``RESULTS.md`` holds every section with the command:

  ops         op sweep, every provider vs torch.clone (bench_ops.py)              ops.json / ops.md / plots
  fixed-cost  per-call fixed cost of noisy_weight at small sizes vs the original
              math, side by side, with the cost broken into pieces (bench_fixed_cost.py)   fixed_cost.*
  import      import pni_fast on top of torch in fresh interpreters; torch._dynamo? (import_time.py)
  sass        SASS per element from benchmarks/sass_report.py when it exists (sass_hook.py)  sass.md
  train       PGD-7 training step, batch 128, per backend (bench_train.py)        train.json / train.md
  model-step  ResNet-20 plain vs PNI vs batched PNI vs reference, interleaved rounds (bench_model.py)

``--skip-ops`` leaves out the op-level parts (ops, fixed-cost), ``--skip-train`` the whole-model parts
(train, model-step); either also leaves out the package-level reports (import, sass: a minute of
interpreters / nvcc), so the narrowed runs of scripts/gpu_check.sh stay within their time limits.
``--skip PART[,PART]`` / ``--only PART[,PART]`` pick single parts.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the memory profiler's start/stop lines
# compile in-process: inductor's pool of compile workers would otherwise start in the background and
# compete with the timed code for the cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_fixed_cost, bench_model, bench_ops, bench_train, common, import_time  # noqa: E402

__all__ = ["PARTS", "FAMILIES", "PACKAGE_LEVEL", "select_parts", "main"]

PARTS = ("ops", "fixed-cost", "import", "sass", "train", "model-step")
FAMILIES = {"ops": ("ops", "fixed-cost"), "train": ("train", "model-step")}
PACKAGE_LEVEL = ("import", "sass")  # left out by --skip-ops and by --skip-train


def _part_list(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts must be a comma-separated subset of {', '.join(PARTS)}; got {text!r}")
    return parts


def select_parts(*, skip_ops: bool = False, skip_train: bool = False, skip: str = "", only: str = "") -> list[str]:
    """The parts a command line asks for, in run order."""
    chosen = list(_part_list(only)) if only else list(PARTS)
    dropped = set(_part_list(skip)) if skip else set()
    if skip_ops:
        dropped |= set(FAMILIES["ops"])
    if skip_train:
        dropped |= set(FAMILIES["train"])
    if (skip_ops or skip_train) and not only:
        dropped |= set(PACKAGE_LEVEL)
    return [p for p in PARTS if p in chosen and p not in dropped]


def _parser():
    p = common.base_parser(__doc__.splitlines()[0], "tiny sizes, seconds: proves the scripts work")
    p.add_argument(
        "--skip-ops",
        action="store_true",
        help="leave out the op-level parts (" + ", ".join(FAMILIES["ops"]) + ") and " + ", ".join(PACKAGE_LEVEL),
    )
    p.add_argument(
        "--skip-train",
        action="store_true",
        help="leave out the whole-model parts (" + ", ".join(FAMILIES["train"]) + ") and " + ", ".join(PACKAGE_LEVEL),
    )
    p.add_argument(
        "--skip", default="", metavar="PARTS", help=f"comma-separated parts to leave out ({', '.join(PARTS)})"
    )
    p.add_argument("--only", default="", metavar="PARTS", help="run only these comma-separated parts")
    p.add_argument("--no-plot", action="store_true", help="do not draw the figures")
    bench_ops.add_arguments(p)
    bench_train.add_arguments(p)
    bench_fixed_cost.add_arguments(p)
    bench_model.add_arguments(p)
    import_time.add_arguments(p)
    return p


def _gpu_sized(opts: dict[str, Any], device: torch.device, **gpu: Any) -> dict[str, Any]:
    """Smaller defaults on a GPU, where scripts/gpu_check.sh gives the benchmarks a short time budget."""
    return dict(opts, **gpu) if device.type == "cuda" else opts


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    try:
        parts = select_parts(skip_ops=args.skip_ops, skip_train=args.skip_train, skip=args.skip, only=args.only)
    except ValueError as exc:
        p.error(str(exc))
    device, out = common.setup_run(args)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run_all.py" + "".join(" " + shlex.quote(a) for a in argv)
    load = common.load_average()
    print(
        f"pni_fast benchmarks on {common.device_name(device)} ({torch.get_num_threads()} threads), "
        f"load average {load}; parts {', '.join(parts) or 'none'}; results -> {out}"
    )
    if load and device.type == "cpu" and load[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load[0]:.2f} on {os.cpu_count()} CPUs: other work competes for the cores "
            "and CPU timings will be slower and noisier than on an idle machine"
        )
    sections = [f"# pni_fast benchmark results: {common.device_name(device)}", "", f"Produced by `{command}`.", ""]
    timings: list[str] = []

    def part(name: str, fn: Callable[[], None]) -> None:
        if name not in parts:
            return
        t0 = time.perf_counter()
        fn()
        timings.append(f"{name} {time.perf_counter() - t0:.1f} s")
        print(f"[run_all] {name} done in {time.perf_counter() - t0:.1f} s")

    def ops() -> None:
        cases = bench_ops.default_cases(args.sizes, full=args.full, quick=args.quick, device_type=device.type)
        meta, records = bench_ops.run(cases, device, **bench_ops.options(args, device))
        bench_ops.write_outputs(out, meta, records, command)
        sections.append(bench_ops.markdown(meta, records, command))
        if not args.no_plot:
            from benchmarks.plot import plot_ops

            for path in plot_ops(out / "ops.json"):
                sections.append(f"![{path.stem}]({path.name})")
            sections.append("")

    def fixed_cost() -> None:
        opts = bench_fixed_cost.options(args, device)
        if not args.quick:
            opts = _gpu_sized(opts, device, rounds=args.fixed_rounds or 5, target_s=0.01, blocks=5)
        meta, records = bench_fixed_cost.run(device, **opts)
        bench_fixed_cost.write_outputs(out, meta, records, command)
        sections.append(bench_fixed_cost.markdown(meta, records, command))

    def imports() -> None:
        opts = import_time.options(args)
        if not args.quick:
            opts = _gpu_sized(opts, device, repeats=args.import_repeats or 3, importtime=False)
        meta, records = import_time.run(**opts)
        import_time.write_outputs(out, meta, records, command)
        sections.append(import_time.markdown(meta, records, command))

    def sass() -> None:
        from benchmarks import sass_hook

        sections.append(sass_hook.run(out, quick=args.quick)["markdown"])

    def train() -> None:
        meta, records = bench_train.run(device, **bench_train.options(args, device))
        bench_train.write_outputs(out, meta, records, command)
        sections.append(bench_train.markdown(meta, records, command))

    def model_step() -> None:
        opts = bench_model.options(args, device)
        if device.type == "cuda" and not args.quick:
            for cfg in opts["scenarios"].values():
                cfg.update(rounds=args.model_rounds or 5, target_s=0.05)
        meta, records = bench_model.run(device, **opts)
        bench_model.write_outputs(out, meta, records, command)
        sections.append(bench_model.markdown(meta, records, command))

    for name, fn in (
        ("ops", ops),
        ("fixed-cost", fixed_cost),
        ("import", imports),
        ("sass", sass),
        ("train", train),
        ("model-step", model_step),
    ):
        part(name, fn)
    sections += ["", f"Time per part: {', '.join(timings) or 'none'}.", ""]
    (out / "RESULTS.md").write_text("\n".join(sections))
    print(f"wrote {out}/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
