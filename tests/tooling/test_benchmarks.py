"""The benchmark scripts run, list every provider, and write the promised files and columns.

One ``run_all.py --quick`` run (a module fixture) feeds every check here. No timing assertions: CI
machines are shared and noisy. What is checked is that the numbers are well-formed (quantiles
ordered, ratios consistent) and that nothing is silently left out. The benchmarks' building blocks
are checked without a run in ``test_benchmark_helpers.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repo import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_fixed_cost, bench_model, bench_ops  # noqa: E402

OPS_KEYS = {
    "device",
    "device_slug",
    "torch",
    "cuda",
    "triton",
    "date_utc",
    "threads",
    "load_avg_1",
    "kind",
    "shape",
    "numel",
    "dtype",
    "alpha_mode",
    "alpha_numel",
    "mode",
    "provider",
    "status",
    "reason",
    "clone_ms",
}
OK_KEYS = {
    "median_ms",
    "q20_ms",
    "q80_ms",
    "min_ms",
    "timer",
    "bytes_moved",
    "gbs",
    "x_clone",
    "frac_peak_bw",
    "peak_mem_bytes",
    "memory_method",
    "speedup_vs_reference",
    "speedup_vs_compile",
    "first_call_ms",
}
PROVIDERS = {"reference", "eager", "compile", "pni_fast-cpu", "pni_fast-cuda", "pni_fast-triton", "pni_fast-torch"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_writes_every_file(quick_run: Path) -> None:
    for name in (
        "ops.json",
        "ops.md",
        "train.json",
        "train.md",
        "RESULTS.md",
        "ops_time.png",
        "ops_gbs.png",
        "fixed_cost.json",
        "fixed_cost.md",
        "model_step.json",
        "model_step.md",
        "import_time.json",
        "import_time.md",
    ):
        assert (quick_run / name).stat().st_size > 0, name
    results = (quick_run / "RESULTS.md").read_text()
    for title in ("Per-call fixed cost", "Whole-model step", "Import time", "SASS per element", "Time per part"):
        assert title in results, title


def test_ops_json_records_are_complete(quick_run: Path) -> None:
    data = json.loads((quick_run / "ops.json").read_text())
    meta, records = data["meta"], data["records"]
    for key in (
        "device",
        "torch",
        "cuda",
        "triton",
        "date_utc",
        "threads",
        "load_avg_1_5_15",
        "peak_bw_gbs",
        "peak_bw_source",
        "bytes_model",
    ):
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
    assert set(names) == {
        "plain",
        "plain-fresh-weight",
        "reference",
        "pni_fast-cpu",
        "pni_fast-cuda",
        "pni_fast-triton",
        "pni_fast-torch",
    }
    assert names["plain"]["status"] == "ok" and names["plain"]["overhead_vs_plain"] == 0
    assert names["reference"]["status"] == "ok" and names["reference"]["peak_mem_bytes"] > 0
    for r in names.values():
        assert r["status"] == "ok" or r["reason"], r


def _median_ratio(num: list[float], den: list[float]) -> float:
    r = sorted(a / b for a, b in zip(num, den))
    return (r[(len(r) - 1) // 2] + r[len(r) // 2]) / 2


def test_fixed_cost_compares_side_by_side(quick_run: Path) -> None:
    data = json.loads((quick_run / "fixed_cost.json").read_text())
    meta, records = data["meta"], data["records"]
    assert meta["sizes"] == list(bench_fixed_cost.QUICK_SIZES) and meta["threads"] == 1
    comp = [r for r in records if r["kind"] == "compare"]
    assert {(r["numel"], r["mode"]) for r in comp} == {(432, m) for m in bench_fixed_cost.MODES}
    for r in comp:
        assert r["status"] == "ok", r
        assert r["shape"] == [16, 3, 3, 3]
        # the ratio is reference / pni_fast per round, median of rounds (>= 1: pni_fast faster)
        assert math.isclose(r["ratio"], _median_ratio(r["reference_rounds_us"], r["pni_fast_rounds_us"]))
        assert math.isclose(r["cpu_ratio"], _median_ratio(r["reference_rounds_cpu_us"], r["pni_fast_rounds_cpu_us"]))
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert len(r["pni_fast_rounds_us"]) == len(r["reference_rounds_us"]) == meta["rounds"]
        assert r["pni_fast_us"] > 0 and r["reference_us"] > 0


def test_fixed_cost_breakdown_is_complete_and_consistent(quick_run: Path) -> None:
    records = json.loads((quick_run / "fixed_cost.json").read_text())["records"]
    rows = {(r["group"], r["piece"]): r for r in records if r["kind"] == "breakdown"}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("reason") for r in rows.values()]
    assert set(rows) == {(g, p) for g, p, _ in bench_fixed_cost.PIECES}
    fwd = "pni_fast forward"
    for stat in ("median_us", "cpu_median_us"):
        m = {k: v[stat] for k, v in rows.items()}
        pieces = ("argument checks", "backend resolve", "sigma", "finite check", "seed draw", "op", "autograd")
        assert math.isclose(m[(fwd, "rest")], m[(fwd, "total")] - sum(m[(fwd, p)] for p in pieces), abs_tol=1e-6)
        bwd = "pni_fast backward"
        assert math.isclose(m[(bwd, "rest")], m[(bwd, "total")] - m[(bwd, "alpha_grad op")], abs_tol=1e-6)
        ref = "reference forward"
        assert math.isclose(
            m[(ref, "rest")],
            m[(ref, "total")] - m[(ref, "std().item()")] - m[(ref, "noise")] - m[(ref, "combine")],
            abs_tol=1e-6,
        )
    for (g, p), r in rows.items():
        if not r.get("derived"):  # measured rows: positive times, ordered quantiles
            assert 0 < r["min_us"] <= r["median_us"] and r["cpu_median_us"] >= 0, (g, p, r)
    md = (quick_run / "fixed_cost.md").read_text()
    assert ">= 1.0x means pni_fast is faster" in md and "Where the time goes" in md


def test_model_step_lists_every_model_and_ratio(quick_run: Path) -> None:
    data = json.loads((quick_run / "model_step.json").read_text())
    records = data["records"]
    assert {(r["scenario"], r["model"]) for r in records} == {
        (s, m) for s in bench_model.QUICK_SCENARIOS for m in bench_model.MODELS
    }
    for r in records:
        assert r["status"] == "ok", r
        plain = next(p for p in records if p["scenario"] == r["scenario"] and p["model"] == "plain")
        ref = next(p for p in records if p["scenario"] == r["scenario"] and p["model"] == "reference")
        assert math.isclose(r["ratio_to_plain"], _median_ratio(r["rounds_ms"], plain["rounds_ms"]))
        assert math.isclose(r["ratio_vs_reference"], _median_ratio(ref["rounds_ms"], r["rounds_ms"]))
        assert r["threads"] == bench_model.QUICK_SCENARIOS[r["scenario"]]["threads"]
    assert all(r["ratio_to_plain"] == 1.0 for r in records if r["model"] == "plain")
    assert "x plain" in (quick_run / "model_step.md").read_text()


def test_import_time_record(quick_run: Path) -> None:
    records = json.loads((quick_run / "import_time.json").read_text())["records"]
    s = next(r for r in records if r["kind"] == "summary")
    reps = [r for r in records if r["kind"] == "repeat"]
    assert len(reps) == 1 and s["torch_median_s"] > 0 and s["pni_fast_median_s"] > 0
    assert s["pni_fast_file"].startswith(str(ROOT))  # the checkout, not some other install
    assert s["imported_by_pni_fast"]["torch._dynamo"] == any(
        r["after"]["torch._dynamo"] and not r["before"]["torch._dynamo"] for r in reps
    )
    assert "`torch._dynamo` imported by `import pni_fast`" in (quick_run / "import_time.md").read_text()
