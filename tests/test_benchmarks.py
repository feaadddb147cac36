"""The benchmark scripts run, list every provider, and write the promised files and columns.

No timing assertions: CI machines are shared and noisy. What is checked is that the numbers are
well-formed (quantiles ordered, ratios consistent) and that nothing is silently left out.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_ops, common  # noqa: E402

OPS_KEYS = {
    "device", "device_slug", "torch", "cuda", "triton", "date_utc", "threads", "load_avg_1",
    "kind", "shape", "numel", "dtype", "alpha_mode", "alpha_numel", "mode", "provider", "status", "reason",
    "clone_ms",
}
OK_KEYS = {"median_ms", "q20_ms", "q80_ms", "min_ms", "timer", "bytes_moved", "gbs", "x_clone", "frac_peak_bw",
           "peak_mem_bytes", "memory_method", "speedup_vs_reference", "speedup_vs_compile", "first_call_ms"}
PROVIDERS = {"reference", "eager", "compile", "pni_fast-cpu", "pni_fast-cuda", "pni_fast-triton", "pni_fast-torch"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_writes_every_file(quick_run: Path) -> None:
    for name in ("ops.json", "ops.md", "train.json", "train.md", "RESULTS.md", "ops_time.png", "ops_gbs.png"):
        assert (quick_run / name).stat().st_size > 0, name


def test_ops_json_records_are_complete(quick_run: Path) -> None:
    data = json.loads((quick_run / "ops.json").read_text())
    meta, records = data["meta"], data["records"]
    for key in ("device", "torch", "cuda", "triton", "date_utc", "threads", "load_avg_1_5_15", "peak_bw_gbs",
                "peak_bw_source", "bytes_model"):
        assert key in meta, key
    assert meta["threads"] == 1
    by_case: dict[tuple, set[str]] = {}
    for r in records:
        assert OPS_KEYS <= set(r), OPS_KEYS - set(r)
        assert r["status"] in ("ok", "unavailable", "error"), r
        if r["status"] == "ok":
            assert OK_KEYS <= set(r), OK_KEYS - set(r)
            assert 0 < r["min_ms"] <= r["q20_ms"] <= r["median_ms"] <= r["q80_ms"], r
            assert math.isclose(r["x_clone"], r["median_ms"] / r["clone_ms"], rel_tol=1e-9)
            assert math.isclose(r["gbs"], r["bytes_moved"] / r["median_ms"] / 1e6, rel_tol=1e-9)
            assert r["peak_mem_bytes"] >= 0
        else:
            assert r["reason"], r  # never unavailable without saying why
        if r["provider"] != "torch.clone":
            key = (r["kind"], tuple(r["shape"]), r["dtype"], r["alpha_mode"], r["mode"])
            by_case.setdefault(key, set()).add(r["provider"])
    assert by_case
    for key, providers in by_case.items():
        assert providers == PROVIDERS, (key, providers)  # nothing silently omitted
    modes = {k[4] for k in by_case}
    assert modes == {"forward", "backward", "fwd_bwd"}
    refs = [r for r in records if r["provider"] == "reference"]
    assert refs and all(r["status"] == "ok" and r["speedup_vs_reference"] == 1.0 for r in refs)


def test_fused_cpu_backend_measured_when_built(quick_run: Path) -> None:
    from pni_fast import _ext

    records = json.loads((quick_run / "ops.json").read_text())["records"]
    cpu = [r for r in records if r["provider"] == "pni_fast-cpu"]
    if not _ext.load():
        assert all(r["status"] == "unavailable" and "extension" in r["reason"] for r in cpu)
    else:
        assert cpu and all(r["status"] == "ok" for r in cpu), [r["reason"] for r in cpu if r["status"] != "ok"]


def test_markdown_tables_have_expected_columns(quick_run: Path) -> None:
    ops_md = (quick_run / "ops.md").read_text()
    for _, header in bench_ops.OPS_COLUMNS + bench_ops.SUMMARY_COLUMNS:
        assert f"| {header} |" in ops_md or f"| {header}" in ops_md, header
    assert "Command: `python benchmarks/run_all.py --quick" in ops_md
    train_md = (quick_run / "train.md").read_text()
    assert "ms / step" in train_md and "overhead vs plain %" in train_md


def test_train_json_lists_every_variant(quick_run: Path) -> None:
    data = json.loads((quick_run / "train.json").read_text())
    assert data["meta"]["batch"] == 2
    names = {r["provider"]: r for r in data["records"]}
    assert set(names) == {"plain", "plain-fresh-weight", "reference", "pni_fast-cpu", "pni_fast-cuda",
                          "pni_fast-triton", "pni_fast-torch"}
    assert names["plain"]["status"] == "ok" and names["plain"]["overhead_vs_plain"] == 0
    assert names["reference"]["status"] == "ok" and names["reference"]["peak_mem_bytes"] > 0
    for r in names.values():
        assert r["status"] == "ok" or r["reason"], r


def test_peak_extra_bytes_sees_an_allocation() -> None:
    n = 1 << 20
    peak, method = common.peak_extra_bytes(lambda: torch.empty(n, dtype=torch.float32), torch.device("cpu"))
    assert 4 * n <= peak < 4 * n + 65536, (peak, method)
    # a temporary freed before the end still counts toward the peak
    peak2, _ = common.peak_extra_bytes(lambda: (torch.empty(2 * n) + 1).sum(), torch.device("cpu"))
    assert peak2 >= 2 * 4 * 2 * n


def test_case_layouts_follow_the_contract() -> None:
    w = bench_ops.Case("weight", (64, 16, 3, 3), "fp32", "channelwise", "forward")
    assert w.alpha_layout() == ((64, 1, 1, 1), 144)
    a = bench_ops.Case("activation", (128, 32, 16, 16), "fp32", "channelwise", "forward")
    assert a.alpha_layout() == ((32,), 256)
    e = bench_ops.Case("activation", (2, 16, 8, 8), "bf16", "elementwise", "fwd_bwd")
    assert e.alpha_layout() == ((16, 8, 8), 1)
    assert bench_ops._bytes_moved(e, 2) == (2 * 2048 + 1024) * 2 + (2048 + 1024) * 2
    assert bench_ops.weight_shape(2304) == (16, 16, 3, 3)
    assert math.prod(bench_ops.weight_shape(3000)) == 3000
    with pytest.raises(ValueError, match="size"):
        bench_ops.weight_shape(0)


def test_default_grid_covers_every_pass_for_layerwise_fp32() -> None:
    cases = bench_ops.default_cases()
    lw = {(c.numel, c.mode) for c in cases if c.kind == "weight" and c.alpha == "layerwise" and c.dtype == "fp32"}
    assert lw == {(n, m) for n in bench_ops.DEFAULT_SIZES for m in bench_ops.MODES}
    assert {c.alpha for c in cases} == set(bench_ops.ALPHA_MODES)
    assert {c.dtype for c in cases} == {"fp32", "bf16"}
    assert {c.shape for c in cases if c.kind == "activation"} == set(bench_ops.ACTIVATION_SHAPES)
    gpu = {c.numel for c in bench_ops.default_cases(device_type="cuda") if c.kind == "weight"}
    assert 8388608 in gpu  # the size the GPU targets are stated at
    full = bench_ops.default_cases(full=True)
    assert len(full) == (len(bench_ops.DEFAULT_SIZES) + 3) * 2 * 3 * 3
