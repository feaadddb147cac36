"""Import time of ``pni_fast`` on top of ``torch``, in fresh interpreters.

Each repeat starts a new Python (the interpreter running this script, the checkout first on
``sys.path``) that times ``import torch`` and then ``import pni_fast`` with ``time.perf_counter``
and reports which heavy modules the second import pulled in: ``torch._dynamo`` (seconds to import;
pni_fast must not need it until ``torch.compile`` runs), ``torch._inductor``, ``triton``,
``numpy``. One warm-up interpreter runs first, untimed, so byte-code caches exist. The median
over repeats is reported. One more interpreter runs with ``-X importtime`` and lists the modules
that take longest within the pni_fast import (cumulative microseconds, as Python reports them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

__all__ = [
    "HEAVY_MODULES",
    "measure_once",
    "parse_importtime",
    "importtime_top",
    "run",
    "markdown",
    "write_outputs",
    "main",
]

HEAVY_MODULES = ("torch._dynamo", "torch._inductor", "triton", "numpy", "sympy")

_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
before = {m: m in sys.modules for m in HEAVY}
n0 = len(sys.modules)
import pni_fast
t2 = time.perf_counter()
print("PNI_IMPORT_JSON " + json.dumps({
    "torch_s": t1 - t0, "pni_fast_s": t2 - t1, "modules_added": len(sys.modules) - n0,
    "before": before, "after": {m: m in sys.modules for m in HEAVY}, "pni_fast_file": pni_fast.__file__,
}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([str(common.REPO_ROOT)] + extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # byte-code caches as a user has them
    return env


def measure_once(python: str = sys.executable, timeout: float = 120) -> dict[str, Any]:
    """One fresh interpreter: seconds for ``import torch`` and then ``import pni_fast``, heavy modules seen."""
    code = f"HEAVY = {HEAVY_MODULES!r}\n" + _PROBE
    proc = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=common.REPO_ROOT
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PNI_IMPORT_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the import probe failed (exit code {proc.returncode}): {proc.stderr[-500:]}")
    return json.loads(line.split(" ", 1)[1])


def parse_importtime(stderr: str, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` slowest modules (cumulative us) imported after ``torch`` in ``-X importtime`` output."""
    pat = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")
    rows, after_torch = [], False
    for line in stderr.splitlines():
        m = pat.match(line)
        if not m:
            continue
        self_us, cum_us, indent, name = int(m[1]), int(m[2]), len(m[3]) - 1, m[4]
        if not after_torch:
            after_torch = name == "torch" and indent == 0  # the top-level torch line closes torch's import
            continue
        rows.append({"module": name, "depth": indent // 2, "self_us": self_us, "cumulative_us": cum_us})
    rows.sort(key=lambda r: -r["cumulative_us"])
    return rows[:top]


def importtime_top(python: str = sys.executable, top: int = 10, timeout: float = 120) -> list[dict[str, Any]]:
    """``-X importtime`` of ``import torch; import pni_fast``: the slowest modules imported by pni_fast
    (cumulative us; nested modules are inside their parents' figures)."""
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", "import torch; import pni_fast"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=common.REPO_ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"python -X importtime failed (exit code {proc.returncode}): {proc.stderr[-500:]}")
    rows = parse_importtime(proc.stderr, top)
    if not rows:
        raise RuntimeError("python -X importtime printed no module imported after torch")
    return rows


class _Skipped(Exception):
    pass


def run(
    *, repeats: int = 7, warmup: bool = True, importtime: bool = True, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``repeats`` timed interpreters after one warm-up; returns ``(meta, records)``."""
    import torch

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    env = common.environment(torch.device("cpu"))
    meta = dict(
        env,
        benchmark="import_time",
        repeats=repeats,
        warmup=warmup,
        python_executable=sys.executable,
        heavy_modules=list(HEAVY_MODULES),
    )
    records: list[dict[str, Any]] = []
    if warmup:
        measure_once()  # byte-code caches, page cache
    runs = []
    for i in range(repeats):
        r = measure_once()
        runs.append(r)
        records.append(dict(kind="repeat", repeat=i, **r))
        log(f"[import] repeat {i + 1}/{repeats}: torch {r['torch_s']:.3f} s, pni_fast on top {r['pni_fast_s']:.3f} s")
    pni = [r["pni_fast_s"] for r in runs]
    tor = [r["torch_s"] for r in runs]
    summary = dict(
        kind="summary",
        torch_median_s=statistics.median(tor),
        torch_min_s=min(tor),
        pni_fast_median_s=statistics.median(pni),
        pni_fast_min_s=min(pni),
        pni_fast_max_s=max(pni),
        modules_added=statistics.median(r["modules_added"] for r in runs),
        pni_fast_file=runs[0]["pni_fast_file"],
        imported_by_pni_fast={m: any(r["after"][m] and not r["before"][m] for r in runs) for m in HEAVY_MODULES},
        imported_by_torch={m: all(r["before"][m] for r in runs) for m in HEAVY_MODULES},
    )
    summary["dynamo_imported"] = any(r["after"]["torch._dynamo"] for r in runs)
    records.append(summary)
    try:
        if not importtime:
            raise _Skipped("skipped in --quick (one more interpreter)")
        records.append(dict(kind="importtime", status="ok", top=importtime_top()))
    except _Skipped as exc:
        records.append(dict(kind="importtime", status="skipped", reason=str(exc)))
    except Exception as exc:  # reported, not hidden
        records.append(dict(kind="importtime", status="error", reason=f"{type(exc).__name__}: {exc}"[:300]))
    log(
        f"[import] median: torch {summary['torch_median_s']:.3f} s, pni_fast on top "
        f"{summary['pni_fast_median_s']:.3f} s; torch._dynamo imported: {summary['dynamo_imported']}"
    )
    meta["load_avg_end_1_5_15"] = common.load_average()
    return meta, records


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    s = next(r for r in records if r["kind"] == "summary")
    rows = [
        {"what": "`import torch`", "median": s["torch_median_s"] * 1e3, "min": s["torch_min_s"] * 1e3},
        {
            "what": "`import pni_fast` after torch",
            "median": s["pni_fast_median_s"] * 1e3,
            "min": s["pni_fast_min_s"] * 1e3,
            "max": s["pni_fast_max_s"] * 1e3,
        },
    ]
    heavy = [
        {
            "module": f"`{m}`",
            "torch": "yes" if s["imported_by_torch"][m] else "no",
            "pni": "yes" if s["imported_by_pni_fast"][m] else "no",
        }
        for m in meta["heavy_modules"]
    ]
    lines = [
        f"## Import time: `import pni_fast` on top of `import torch`, {meta['device']}",
        "",
        f"Command: `{command}`  ",
        f"torch {meta['torch']}, Python {meta['python']}, {meta['date_utc']}, commit {meta['git_commit']}  ",
        f"Load average (1/5/15 min): {meta['load_avg_1_5_15']} at start, {meta.get('load_avg_end_1_5_15')} at end "
        f"({meta['cpu_count']} CPUs)  ",
        f"{meta['repeats']} fresh interpreters{' after one untimed warm-up' if meta['warmup'] else ''}; "
        "`time.perf_counter` around each import; "
        f"pni_fast from `{s['pni_fast_file']}`; it adds {s['modules_added']:.0f} modules to `sys.modules`.",
        "",
        common.markdown_table(
            rows, [("what", "import"), ("median", "median ms"), ("min", "min ms"), ("max", "max ms")]
        ),
        "",
        f"**`torch._dynamo` imported by `import pni_fast`: {yes(s['imported_by_pni_fast']['torch._dynamo'])}**"
        f" (present after both imports: {yes(s['dynamo_imported'])}).",
        "",
        common.markdown_table(
            heavy,
            [("module", "module"), ("torch", "imported by `import torch`"), ("pni", "imported by `import pni_fast`")],
        ),
        "",
    ]
    it = next((r for r in records if r["kind"] == "importtime"), None)
    if it and it["status"] == "ok":
        top = [
            dict(
                r,
                module=f"`{'  ' * r['depth']}{r['module']}`",
                cum_ms=r["cumulative_us"] / 1e3,
                self_ms=r["self_us"] / 1e3,
            )
            for r in it["top"]
        ]
        lines += [
            "Slowest modules within the pni_fast import (`python -X importtime`, one run; cumulative "
            "includes nested imports):",
            "",
            common.markdown_table(top, [("module", "module"), ("cum_ms", "cumulative ms"), ("self_ms", "self ms")]),
            "",
        ]
    elif it:
        lines += [f"`-X importtime`: {it['reason']}", ""]
    return "\n".join(lines)


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "import_time.json", meta, records)
    (out_dir / "import_time.md").write_text(markdown(meta, records, command))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--import-repeats",
        type=int,
        default=None,
        help="fresh interpreters to time (default 7; 1 with --quick, then no warm-up and no -X importtime)",
    )


def options(args: argparse.Namespace) -> dict[str, Any]:
    repeats = args.import_repeats or (1 if args.quick else 7)
    if repeats < 1:
        raise ValueError(f"--import-repeats must be >= 1, got {repeats}")
    return dict(repeats=repeats, warmup=not args.quick, importtime=not args.quick)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0], "2 repeats: proves the script works")
    add_arguments(p)
    args = p.parse_args(argv)
    _, out = common.setup_run(args)
    meta, records = run(**options(args))
    write_outputs(out, meta, records, "python benchmarks/import_time.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out}/import_time.json and import_time.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
