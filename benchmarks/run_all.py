"""Run every benchmark at its default size and write results under benchmarks/results/<device>/.

``python benchmarks/run_all.py``          op sweep + training step (a few minutes on 2 CPU cores)
``python benchmarks/run_all.py --quick``  tiny sizes, seconds: proves the scripts work (CI)
``python benchmarks/run_all.py --full``   every size x alpha mode x dtype x pass (long)

Writes ``ops.json``, ``train.json`` (one record per measurement, each naming device, versions,
date, thread count and load), ``ops.md`` / ``train.md`` and ``RESULTS.md`` (both tables with the
command), and ``ops_time.png`` / ``ops_gbs.png``.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the memory profiler's start/stop lines
# compile in-process: inductor's pool of compile workers would otherwise start in the background and
# compete with the timed code for the cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_ops, bench_train, common  # noqa: E402

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.base_parser(__doc__.splitlines()[0], "tiny sizes, seconds: proves the scripts work")
    p.add_argument("--skip-ops", action="store_true", help="leave out the op benchmark")
    p.add_argument("--skip-train", action="store_true", help="leave out the training-step benchmark")
    p.add_argument("--no-plot", action="store_true", help="do not draw the figures")
    bench_ops.add_arguments(p)
    bench_train.add_arguments(p)
    args = p.parse_args(argv)
    device, out = common.setup_run(args)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run_all.py" + "".join(" " + shlex.quote(a) for a in argv)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"pni_fast benchmarks on {common.device_name(device)} ({torch.get_num_threads()} threads), "
          f"load average {load}; results -> {out}")
    if load and device.type == "cpu" and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load[0]:.2f} on {os.cpu_count()} CPUs: other work competes for the cores "
              "and CPU timings will be slower and noisier than on an idle machine")
    sections = [f"# pni_fast benchmark results: {common.device_name(device)}", "",
                f"Produced by `{command}`.", ""]
    if not args.skip_ops:
        cases = bench_ops.default_cases(args.sizes, full=args.full, quick=args.quick, device_type=device.type)
        meta, records = bench_ops.run(cases, device, **bench_ops.options(args, device))
        bench_ops.write_outputs(out, meta, records, command)
        sections.append(bench_ops.markdown(meta, records, command))
        if not args.no_plot:
            from benchmarks.plot import plot_ops

            for path in plot_ops(out / "ops.json"):
                sections.append(f"![{path.stem}]({path.name})")
            sections.append("")
    if not args.skip_train:
        meta, records = bench_train.run(device, **bench_train.options(args, device))
        bench_train.write_outputs(out, meta, records, command)
        sections.append(bench_train.markdown(meta, records, command))
    (out / "RESULTS.md").write_text("\n".join(sections))
    print(f"wrote {out}/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
