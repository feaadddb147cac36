"""The benchmark scripts run, list every provider, and write the promised files and columns.

No timing assertions: CI machines are shared and noisy. What is checked is that the numbers are
well-formed (quantiles ordered, ratios consistent) and that nothing is silently left out.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_fixed_cost, bench_model, bench_ops, common, import_time, loops, run_all  # noqa: E402

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


# ---------------------------------------------------------------------------------------------
# fixed cost, whole-model step, import time, SASS hook, part selection
# ---------------------------------------------------------------------------------------------


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


def test_model_variants_inject_noise() -> None:
    x = torch.rand(2, 3, 32, 32)
    outs = {}
    for name in bench_model.MODELS:
        model, handle = bench_model.build_model(name, torch.device("cpu"))
        with torch.no_grad():
            outs[name] = (model(x), model(x))
        if handle is not None:
            handle.remove()
    for name, (a, b) in outs.items():
        noisy = name not in ("plain", "plain-fresh-weight")
        assert (not torch.equal(a, b)) == noisy, name  # noisy models draw fresh noise per forward
    assert torch.allclose(outs["plain"][0], outs["plain-fresh-weight"][0], atol=1e-5)  # same weights


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


def test_parse_importtime_keeps_what_comes_after_torch() -> None:
    text = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        100 |   numpy",
            "import time:      5000 |       9000 | torch",
            "import time:       300 |        300 |     pni_fast.rng",
            "import time:       700 |       1000 |   pni_fast.functional",
            "import time:      2000 |       4000 | pni_fast",
        ]
    )
    rows = import_time.parse_importtime(text)
    assert [r["module"] for r in rows] == ["pni_fast", "pni_fast.functional", "pni_fast.rng"]
    assert [r["depth"] for r in rows] == [0, 1, 2] and rows[0]["self_us"] == 2000


def test_sass_section(tmp_path, monkeypatch) -> None:
    from benchmarks import sass_hook

    monkeypatch.setattr(sass_hook, "SCRIPT", tmp_path / "sass_report.py")
    monkeypatch.setattr(sass_hook.common, "REPO_ROOT", tmp_path)
    res = sass_hook.run(tmp_path / "out", log=lambda s: None)
    assert res["status"] == "skipped" and "does not exist" in res["reason"]
    (tmp_path / "sass_report.py").write_text(
        "import sys\nassert sys.argv[1] == '--out'\nprint('note')\nprint('| kernel | SASS/elem |')\n"
        "print('|---|---|')\nprint('| perturb | 12.5 |')\n"
    )
    res = sass_hook.run(tmp_path / "out", log=lambda s: None)
    assert res["status"] == "ok" and "| perturb | 12.5 |" in res["markdown"] and "note" not in res["markdown"]
    assert "| perturb | 12.5 |" in (tmp_path / "out" / "sass.md").read_text()
    res = sass_hook.run(tmp_path / "out_quick", quick=True, log=lambda s: None)  # no --quick option: skipped
    assert res["status"] == "skipped" and "--quick" in res["reason"] and not (tmp_path / "out_quick").exists()
    (tmp_path / "sass_report.py").write_text("import sys\nsys.exit('cuobjdump failed')\n")
    res = sass_hook.run(tmp_path / "out2", log=lambda s: None)
    assert res["status"] == "error" and "cuobjdump failed" in res["reason"]
    (tmp_path / "sass_report.py").write_text("import sys\nsys.exit('cuobjdump not found; nothing to report')\n")
    res = sass_hook.run(tmp_path / "out3", log=lambda s: None)
    assert res["status"] == "skipped" and "nothing to report" in res["reason"]


def test_quick_default_folder_is_separate_and_ignored() -> None:
    cpu = torch.device("cpu")
    quick, full = common.default_out(cpu, quick=True), common.default_out(cpu, quick=False)
    assert quick != full and quick.parent == ROOT / "benchmarks" / "results" / "quick"
    args = run_all._parser().parse_args(["--quick"])
    assert common.setup_run(args)[1] == quick
    proc = subprocess.run(["git", "check-ignore", "-q", str(quick / "fixed_cost.json")], cwd=ROOT)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, "benchmarks/results/quick/ must be git-ignored"


def test_part_selection_and_gpu_check_options() -> None:
    assert run_all.select_parts() == list(run_all.PARTS)
    # gpu_check's narrowed runs: no import timing, no nvcc-compiling SASS report
    assert run_all.select_parts(skip_ops=True) == ["train", "model-step"]
    assert run_all.select_parts(skip_train=True) == ["ops", "fixed-cost"]
    assert run_all.select_parts(skip_train=True, only="ops,sass") == ["ops", "sass"]
    assert run_all.select_parts(only="import,fixed-cost") == ["fixed-cost", "import"]
    assert run_all.select_parts(skip="sass,ops") == ["fixed-cost", "import", "train", "model-step"]
    with pytest.raises(ValueError, match="subset"):
        run_all.select_parts(only="opz")
    # every run_all.py command line in scripts/gpu_check.sh parses
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    calls = re.findall(r'"\$PYTHON" benchmarks/run_all\.py ([^|\n]*)', script)
    assert len(calls) >= 3, calls
    for call in calls:
        argv = shlex.split(call.replace("\\", ""))
        argv = [a if not a.startswith("$") else "/tmp/x" for a in argv]  # shell variables: OUT folders
        args = run_all._parser().parse_args(argv)
        run_all.select_parts(skip_ops=args.skip_ops, skip_train=args.skip_train, skip=args.skip, only=args.only)


def test_interleaved_rotates_order_and_ratio() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    wall, cpu, ns = loops.interleaved(fns, rounds=3, target_s=0.0)
    assert all(len(v) == 3 for v in wall.values()) and all(n >= 1 for n in ns.values())
    assert all(t >= 0 for v in cpu.values() for t in v)
    timed = calls[-sum(ns.values()) * 3 :]
    i = 0
    for r in range(3):
        order = ["a", "b", "c"][r:] + ["a", "b", "c"][:r]
        firsts_round = []
        for name in order:
            firsts_round.append(timed[i])
            i += ns[name]
        assert firsts_round == order
    s = loops.ratio_summary([2.0, 4.0, 3.0], [1.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.5, "max": 4.0}
