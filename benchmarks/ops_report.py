"""The op benchmark's report: the Markdown tables (summary and every record) and the ``ops.json`` /
``ops.md`` files, from the records ``bench_ops.run`` returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks import common
from benchmarks.ops_cases import DTYPES

__all__ = ["OPS_COLUMNS", "SUMMARY_COLUMNS", "table_rows", "summary_rows", "markdown", "write_outputs"]

OPS_COLUMNS = [
    ("kind", "tensor"),
    ("shape", "shape"),
    ("numel", "elements"),
    ("dtype", "dtype"),
    ("alpha_mode", "alpha"),
    ("mode", "pass"),
    ("provider", "provider"),
    ("median_ms", "median ms"),
    ("q20_ms", "q20 ms"),
    ("q80_ms", "q80 ms"),
    ("min_ms", "min ms"),
    ("gbs", "GB/s"),
    ("x_clone", "x clone"),
    ("pct_peak", "% peak BW"),
    ("peak_mem_mb", "peak MB"),
    ("speedup_vs_reference", "speed-up vs ref"),
    ("speedup_vs_compile", "speed-up vs compile"),
    ("note", "note"),
]


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with display-only fields (MB, %, note) added."""
    rows = []
    for r in records:
        row = dict(r)
        row["shape"] = "x".join(map(str, r["shape"]))
        row["peak_mem_mb"] = r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None else None
        row["pct_peak"] = 100 * r["frac_peak_bw"] if r.get("frac_peak_bw") is not None else None
        row["note"] = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        rows.append(row)
    return rows


SUMMARY_COLUMNS = [
    ("numel", "elements"),
    ("provider", "provider"),
    ("fwd_ms", "fwd ms"),
    ("fwd_min", "fwd min ms"),
    ("fwd_speedup", "fwd x ref"),
    ("fwd_x_clone", "fwd / clone"),
    ("fb_ms", "fwd+bwd ms"),
    ("fb_min", "fwd+bwd min ms"),
    ("fb_speedup", "fwd+bwd x ref"),
    ("fb_vs_compile", "fwd+bwd x compile"),
    ("fb_mem_mb", "fwd+bwd peak MB"),
    ("fb_mem_sizes", "peak / tensor size"),
    ("note", "note"),
]


def summary_rows(records: list[dict[str, Any]], dtype: str = "fp32") -> list[dict[str, Any]]:
    """Layerwise weight noise per size and provider: forward and fwd+bwd vs reference and clone."""
    sel = [r for r in records if r["kind"] == "weight" and r["dtype"] == dtype]
    rows: list[dict[str, Any]] = []
    for numel in sorted({r["numel"] for r in sel}):
        clone = next((r for r in sel if r["numel"] == numel and r["provider"] == "torch.clone"), None)
        if clone:
            rows.append(
                {
                    "numel": numel,
                    "provider": "torch.clone",
                    "fwd_ms": clone["median_ms"],
                    "fwd_min": clone.get("min_ms"),
                    "fwd_x_clone": 1.0,
                    "fb_mem_mb": None,
                    "note": "",
                }
            )
        names = [p for p in dict.fromkeys(r["provider"] for r in sel) if p != "torch.clone"]
        for name in names:

            def get(mode: str) -> Optional[dict[str, Any]]:
                return next(
                    (
                        r
                        for r in sel
                        if r["numel"] == numel
                        and r["provider"] == name
                        and r["alpha_mode"] == "layerwise"
                        and r["mode"] == mode
                    ),
                    None,
                )

            fwd, fb = get("forward"), get("fwd_bwd")
            if fwd is None and fb is None:
                continue
            row: dict[str, Any] = {"numel": numel, "provider": name}
            bad = [r for r in (fwd, fb) if r is not None and r["status"] != "ok"]
            row["note"] = f"{bad[0]['status']}: {bad[0]['reason']}" if bad else ""
            if fwd is not None and fwd["status"] == "ok":
                row.update(
                    fwd_ms=fwd["median_ms"],
                    fwd_min=fwd.get("min_ms"),
                    fwd_speedup=fwd["speedup_vs_reference"],
                    fwd_x_clone=fwd["x_clone"],
                )
            if fb is not None and fb["status"] == "ok":
                row.update(
                    fb_ms=fb["median_ms"],
                    fb_min=fb.get("min_ms"),
                    fb_speedup=fb["speedup_vs_reference"],
                    fb_vs_compile=fb.get("speedup_vs_compile"),
                )
                if fb.get("peak_mem_bytes") is not None:
                    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
                    row["fb_mem_mb"] = fb["peak_mem_bytes"] / 2**20
                    row["fb_mem_sizes"] = fb["peak_mem_bytes"] / (numel * itemsize)
            rows.append(row)
    return rows


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    """The ops section of a results file: how it was measured, the summary, then every record."""
    lines = [
        f"## Op benchmark: {meta['device']}",
        "",
        f"Command: `{command}`  ",
        f"torch {meta['torch']}, CUDA {meta['cuda']}{common.driver_text(meta)}, triton {meta['triton']}, "
        f"{meta['threads']} threads, "
        f"{meta['date_utc']}, commit {meta['git_commit']}  ",
        f"Load average (1/5/15 min): {meta['load_avg_1_5_15']} at start, {meta.get('load_avg_end_1_5_15')} at end "
        "(the end figure includes this run's own threads)  ",
        f"Peak bandwidth: {common.fmt(meta['peak_bw_gbs'])} GB/s ({meta['peak_bw_source']})  ",
        f"GB/s bytes model: {meta['bytes_model']}  ",
        f"torch.compile: {meta.get('compile_settings')}  ",
        f"Peak memory: {next((r['memory_method'] for r in records if r.get('memory_method')), 'not measured')}; "
        "extra bytes allocated by the call and alive at its peak (output and saved tensors included).",
        "",
        "### Summary: layerwise fp32 weight noise (forward; forward+backward)",
        "",
        "Ratios use medians; the minimum is shown beside the median because it is the figure least "
        "disturbed by other work on a shared machine.",
        "",
        common.markdown_table(summary_rows(records), SUMMARY_COLUMNS),
        "",
        "### All measurements",
        "",
        common.markdown_table(table_rows(records), OPS_COLUMNS),
        "",
    ]
    return "\n".join(lines)


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "ops.json", meta, records)
    (out_dir / "ops.md").write_text(markdown(meta, records, command))
