"""Op benchmark: one PNI noise op, every provider side by side, against torch.clone.

Providers (each listed, with a reason when it cannot run):
  reference          paper-faithful: ``std().item()`` host sync + stored ``normal_`` noise
  eager              the same math without ``.item()`` (sigma stays a 0-d tensor)
  compile            ``torch.compile(fullgraph=True)`` of ``eager``
  pni_fast-<b>       ``pni_fast.functional.noisy_weight`` / ``inject_noise`` with ``backend=b``
                     for b in cpu, cuda, triton, torch
and ``torch.clone`` of the same tensor, timed in the same run: one read + one write, the floor
of any out-of-place op.

Bytes model for GB/s (stated in every record): the minimum traffic of an ideal kernel,
forward = read v + write out (+ read alpha); backward = read grad (+ write grad alpha; the
gradient of v is the incoming gradient itself, no copy); fwd+bwd = both. The std pass and any
stored noise are NOT counted, so GB/s compares providers on the same work and equals
``2 * numel * itemsize / time`` for a clone.

Inputs require grad in every mode (a training forward builds the graph and saves what
backward needs); gradients come from ``torch.autograd.grad`` so nothing accumulates into ``.grad``.

This file holds the timing loop and the command line; the case grid and bytes model are in
``ops_cases.py``, the providers in ``ops_providers.py``, the tables and files in ``ops_report.py``
(their names are re-exported here, where ``run_all.py`` and the tests use them).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # the CPU memory profiler's start/stop lines are noise here
# compile in-process: inductor's pool of compile workers would otherwise start in the background and
# compete with the timed code for the cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.ops_cases import (  # noqa: E402, F401  (re-exported: the grid's names, used from bench_ops)
    ACTIVATION_SHAPES,
    ALPHA_MODES,
    BASE_PROVIDERS,
    BYTES_MODEL,
    DEFAULT_SIZES,
    DEFAULT_SIZES_GPU,
    DTYPES,
    MODES,
    PNI_BACKENDS,
    QUICK_ACTIVATION_SHAPES,
    QUICK_SIZES,
    WEIGHT_SHAPES,
    Case,
    bytes_moved,
    default_cases,
    weight_shape,
)
from benchmarks.ops_providers import COMPILE_SETTINGS, Providers, Unavailable  # noqa: E402
from benchmarks.ops_report import (  # noqa: E402, F401  (re-exported: run_all.py writes the report through here)
    OPS_COLUMNS,
    SUMMARY_COLUMNS,
    markdown,
    summary_rows,
    table_rows,
    write_outputs,
)

__all__ = ["Case", "default_cases", "run", "summary_rows", "write_outputs", "main"]


def _call_for(case: Case, fn: Callable, v: torch.Tensor, alpha: torch.Tensor, g: torch.Tensor) -> Callable:
    if case.mode == "forward":
        return lambda: fn(v, alpha)
    if case.mode == "backward":
        out = fn(v, alpha)
        return lambda: torch.autograd.grad(out, (v, alpha), g, retain_graph=True)
    return lambda: torch.autograd.grad(fn(v, alpha), (v, alpha), g)


def _case_fields(case: Case) -> dict[str, Any]:
    return {
        "kind": case.kind,
        "shape": list(case.shape),
        "numel": case.numel,
        "dtype": case.dtype,
        "alpha_mode": case.alpha,
        "alpha_numel": math.prod(case.alpha_layout()[0]),
        "mode": case.mode,
    }


def _measure(
    rec: dict[str, Any],
    fn: Callable,
    case: Case,
    v: torch.Tensor,
    alpha: torch.Tensor,
    g: torch.Tensor,
    device: torch.device,
    min_run_time: float,
    measure_memory: bool,
    peak_gbs: Optional[float],
    itemsize: int,
    clone_ms: float,
) -> None:
    """Time (and measure the memory of) one provider on one case; fills ``rec``."""
    call = _call_for(case, fn, v, alpha, g)
    t0 = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rec["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    # warm up for a while, not one call: caches, allocator and (for compile) lazily built pieces settle
    warm_until = time.perf_counter() + (0.5 if rec["provider"] == "compile" else 0.05)
    call()
    while time.perf_counter() < warm_until:
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = common.time_call(call, device, min_run_time)
    rec.update(t, status="ok", reason=None)
    nbytes = bytes_moved(case, itemsize)
    rec["bytes_moved"] = nbytes
    rec["gbs"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
    rec["x_clone"] = t["median_ms"] / clone_ms
    rec["frac_peak_bw"] = rec["gbs"] / peak_gbs if peak_gbs else None
    if measure_memory:
        rec["peak_mem_bytes"], rec["memory_method"] = common.peak_extra_bytes(call, device)


def run(
    cases: list[Case],
    device: torch.device,
    *,
    compile_: bool = True,
    compile_reason: str = "",
    slow_max_numel: Optional[int] = None,
    min_run_time: float = 0.2,
    measure_memory: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every provider on every case; returns ``(meta, records)`` (one record per measurement)."""
    env = common.environment(device)
    peak_gbs, peak_src = common.peak_bandwidth(device)
    providers = Providers(device, compile_=compile_, compile_reason=compile_reason, slow_max_numel=slow_max_numel)
    meta = dict(
        env,
        peak_bw_gbs=peak_gbs,
        peak_bw_source=peak_src,
        bytes_model=BYTES_MODEL,
        benchmark="ops",
        compile_settings=COMPILE_SETTINGS if compile_ else compile_reason,
    )
    base = {k: env[k] for k in ("device", "device_slug", "torch", "cuda", "triton", "date_utc", "threads")}
    base["load_avg_1"] = env["load_avg_1_5_15"][0] if env["load_avg_1_5_15"] else None
    records: list[dict[str, Any]] = []
    clone_ms: dict[tuple, float] = {}
    torch.manual_seed(0)
    for i, case in enumerate(cases):
        dtype = DTYPES[case.dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        v = torch.randn(case.shape, device=device, dtype=dtype).requires_grad_()
        ashape, _ = case.alpha_layout()
        alpha = torch.full(ashape, 0.25, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(case.shape, device=device, dtype=dtype)
        ckey = (case.shape, case.dtype)
        if ckey not in clone_ms:
            src = v.detach()
            src.clone()
            t = common.time_call(lambda: src.clone(), device, min_run_time)
            clone_ms[ckey] = t["median_ms"]
            mem, mem_method = common.peak_extra_bytes(lambda: src.clone(), device) if measure_memory else (None, None)
            nbytes = 2 * case.numel * itemsize
            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rec = dict(base, **_case_fields(Case(case.kind, case.shape, case.dtype, "layerwise", "forward")))
            rec.update(alpha_mode=None, alpha_numel=None)
            records.append(
                dict(
                    rec,
                    provider="torch.clone",
                    status="ok",
                    reason=None,
                    **t,
                    bytes_moved=nbytes,
                    gbs=gbs,
                    clone_ms=t["median_ms"],
                    x_clone=1.0,
                    frac_peak_bw=gbs / peak_gbs if peak_gbs else None,
                    peak_mem_bytes=mem,
                    memory_method=mem_method,
                    speedup_vs_reference=None,
                    speedup_vs_compile=None,
                    first_call_ms=None,
                )
            )
        ref_ms: Optional[float] = None
        compile_ms: Optional[float] = None
        for name in providers.names():
            rec = dict(base, **_case_fields(case), provider=name, clone_ms=clone_ms[ckey])
            try:
                with providers.measure_context(name, case):
                    _measure(
                        rec,
                        providers.build(name, case),
                        case,
                        v,
                        alpha,
                        g,
                        device,
                        min_run_time,
                        measure_memory,
                        peak_gbs,
                        itemsize,
                        clone_ms[ckey],
                    )
                if name == "reference":
                    ref_ms = rec["median_ms"]
                if name == "compile":
                    compile_ms = rec["median_ms"]
                rec["speedup_vs_reference"] = ref_ms / rec["median_ms"] if ref_ms else None
                rec["speedup_vs_compile"] = compile_ms / rec["median_ms"] if compile_ms else None
            except Unavailable as exc:
                rec.update(status="unavailable", reason=str(exc))
            except Exception as exc:  # a provider that crashes is reported, not hidden
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                if name == "compile":
                    providers.note_compile_failure(case, f"torch.compile failed: {reason}")
                    rec.update(status="unavailable", reason=f"torch.compile failed: {reason}")
                else:
                    rec.update(status="error", reason=reason)
            records.append(rec)
            status = f"{rec['median_ms']:.4g} ms" if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}"
            log(
                f"[ops {i + 1}/{len(cases)}] {case.kind} {list(case.shape)} {case.dtype} {case.alpha} "
                f"{case.mode} {name}: {status}"
            )
        del v, alpha, g
    # the load at the end includes this benchmark's own threads; compare with load_avg_1_5_15 at the start
    meta["load_avg_end_1_5_15"] = common.load_average()
    return meta, records


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        type=lambda s: tuple(int(float(x)) for x in s.split(",")),
        default=None,
        help="comma-separated weight sizes in elements (default 2304,65536,1048576,4194304,16777216)",
    )
    p.add_argument("--full", action="store_true", help="every size x alpha mode x dtype x pass (long)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile (listed as skipped)")
    p.add_argument("--compile", action="store_true", help="include torch.compile even with --quick")
    p.add_argument(
        "--slow-max-numel",
        type=int,
        default=None,
        help="largest size for the pure-PyTorch backend on CPU (default 1048576; GPU: no limit)",
    )
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per CPU measurement")


def options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``run`` from the command line."""
    compile_ = not args.no_compile and (not args.quick or args.compile)
    reason = (
        "skipped: --no-compile"
        if args.no_compile
        else "skipped: --quick leaves out torch.compile (tens of seconds of compilation); add --compile"
    )
    slow = args.slow_max_numel
    if slow is None and device.type == "cpu":
        slow = 2**20
    min_rt = args.min_run_time if args.min_run_time is not None else (0.02 if args.quick else 0.2)
    return dict(compile_=compile_, compile_reason=reason, slow_max_numel=slow, min_run_time=min_rt)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0], "tiny sizes, seconds: proves the script works")
    add_arguments(p)
    args = p.parse_args(argv)
    device, out = common.setup_run(args)
    cases = default_cases(args.sizes, full=args.full, quick=args.quick, device_type=device.type)
    meta, records = run(cases, device, **options(args, device))
    write_outputs(out, meta, records, "python benchmarks/bench_ops.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out}/ops.json and ops.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
