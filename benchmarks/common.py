"""Shared benchmark plumbing: environment record, timing, peak memory, bandwidth, output files.

Every number the benchmarks publish goes through here, so the methods are stated once:

* time: GPU -> ``triton.testing.do_bench`` (median and 20/80 % quantiles, L2 flushed between
  runs; CUDA events when triton is missing); CPU -> ``torch.utils.benchmark.Timer``
  ``blocked_autorange`` (median and 20/80 % quantiles of the per-block means).
* peak memory: GPU -> ``torch.cuda.max_memory_allocated`` minus the allocation before the call;
  CPU -> the PyTorch CPU allocator's own allocation/free events recorded by
  ``torch.profiler`` (``profile_memory=True``), summed in time order: the peak of bytes allocated
  by the call and still alive, i.e. tensors made by PyTorch ops, compiled code and C++
  extensions (malloc outside the PyTorch allocator is not seen).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import itertools
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "REPO_ROOT",
    "environment",
    "device_slug",
    "device_name",
    "time_call",
    "peak_extra_bytes",
    "peak_bandwidth",
    "write_json",
    "markdown_table",
    "fmt",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Published peak DRAM/HBM bandwidth (GB/s, 1e9 bytes) by a substring of torch.cuda.get_device_name().
# Order matters: the first match wins, so specific names come before generic ones.
_GPU_PEAK_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human-readable name of the device that runs the benchmark."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    text = re.sub(r"\b(processor|cpu|\d+-core)\b", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_slug(device: torch.device) -> str:
    """Directory name for results, e.g. ``cpu-amd-epyc-2t`` or ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(_cpu_model())}-{torch.get_num_threads()}t"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _pni_fast_status() -> dict[str, Any]:
    try:
        from pni_fast import _ext, backends

        return {"extension": _ext.status_message(), "backends_cpu": backends.available_backends("cpu")}
    except Exception as exc:  # the benchmark must still say what it could not import
        return {"error": f"{type(exc).__name__}: {exc}"}


def load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages (rounded), None where the OS has none: timings depend on it."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to reproduce or compare a run; copied into every record."""
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": load_average(),
        "git_commit": _git_commit(),
        "pni_fast": _pni_fast_status(),
    }
    if device.type == "cuda":
        env["cuda_driver"] = None
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["cuda_driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in qs]


def time_call(fn: Callable[[], Any], device: torch.device, min_run_time: float = 0.2) -> dict[str, Any]:
    """Median, 20/80 % quantiles and minimum of one call of ``fn``, in milliseconds.

    The minimum is the figure least disturbed by other work on a shared machine; the tables
    report the median.

    ``fn`` must already be warm (compiled, caches filled): the caller runs it once first.
    """
    if device.type == "cuda":
        try:
            import triton.testing

            med, q20, q80, q0 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8, 0.0])
            return {"median_ms": med, "q20_ms": q20, "q80_ms": q80, "min_ms": q0, "timer": "triton.testing.do_bench"}
        except ImportError:
            times = []
            for _ in range(50):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            med, q20, q80 = _quantiles(times, (0.5, 0.2, 0.8))
            return {"median_ms": med, "q20_ms": q20, "q80_ms": q80, "min_ms": min(times), "timer": "cuda events x50"}
    import torch.utils.benchmark as tbench

    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < 5:  # slow calls: blocked_autorange may stop after one or two blocks
        times.extend(timer.timeit(1).times)
    med, q20, q80 = _quantiles([t * 1e3 for t in times], (0.5, 0.2, 0.8))
    return {
        "median_ms": med,
        "q20_ms": q20,
        "q80_ms": q80,
        "min_ms": min(times) * 1e3,
        "timer": f"torch.utils.benchmark blocked_autorange ({len(times)} blocks)",
    }


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    What ``fn`` returns is kept alive until the end, so outputs and tensors saved for backward
    count. Returns ``(bytes, method)``.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak), "torch.cuda.max_memory_allocated - allocated before"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    peak = max(itertools.accumulate((e.nbytes() for e in events), initial=0))
    return int(peak), "torch.profiler CPU allocator events (profile_memory=True), running sum peak"


def peak_bandwidth(device: torch.device) -> tuple[Optional[float], str]:
    """The bandwidth that '% of peak' refers to: a published figure on GPU, a measured clone on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbs in _GPU_PEAK_GBS:
            if key in name:
                return gbs, f"published peak for '{key}'"
        return None, f"unknown: no published peak for '{name}' in benchmarks/common.py"
    n = 32 * 2**20  # 128 MiB of fp32: far beyond any CPU cache
    x = torch.randn(n)
    x.clone()
    t = time_call(lambda: x.clone(), device, min_run_time=0.3)["median_ms"]
    gbs = 2 * n * 4 / (t * 1e-3) / 1e9
    return gbs, (
        f"measured, not a hardware spec: torch.clone of 128 MiB fp32 with {torch.get_num_threads()} "
        "threads (read + write), the practical peak of this machine"
    )


def driver_text(meta: dict[str, Any]) -> str:
    """`` (driver X)`` for GPU runs, empty on CPU."""
    return f" (driver {meta['cuda_driver']})" if meta.get("cuda_driver") else ""


def write_json(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1, default=str)
        f.write("\n")


def fmt(value: Any, digits: int = 3) -> str:
    """Compact cell text: significant digits for floats, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 10**digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub Markdown table; ``columns`` is a list of ``(record key, header)``."""
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def base_parser(description: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares: --quick, --device, --threads, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; recorded)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results/<device>; with --quick "
        "benchmarks/results/quick/<device>, git-ignored, so a quick run never overwrites the committed "
        "results)",
    )
    return p


def setup_run(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """Apply --threads, resolve --device and the output folder of a parsed ``base_parser``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    return device, args.out or default_out(device, quick=bool(getattr(args, "quick", False)))


def default_out(device: torch.device, *, quick: bool) -> Path:
    """``benchmarks/results/<device>`` (the committed results the README cites), or
    ``benchmarks/results/quick/<device>`` for ``--quick`` runs (git-ignored: see benchmarks/.gitignore)."""
    results = REPO_ROOT / "benchmarks" / "results"
    return (results / "quick" if quick else results) / device_slug(device)


def parse_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asked for CUDA but torch.cuda.is_available() is False")
    return dev
