"""The benchmarks' building blocks, checked without a benchmark run: the op grid and its layouts, the
memory measurement, the interleaved timing loop, the model variants, import-time parsing, the SASS
hook, part selection and the default output folder.

The checks of what a ``run_all.py --quick`` run writes are in ``test_benchmarks.py``.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys

import pytest
import torch

from repo import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    bench_fixed_cost,
    bench_model,
    bench_ops,
    common,
    fixed_cost_pieces,
    fixed_cost_report,
    import_time,
    loops,
    ops_cases,
    ops_report,
    run_all,
)


def test_peak_extra_bytes_sees_an_allocation() -> None:
    n = 1 << 20
    peak, method = common.peak_extra_bytes(lambda: torch.empty(n, dtype=torch.float32), torch.device("cpu"))
    assert 4 * n <= peak < 4 * n + 65536, (peak, method)
    # a temporary freed before the end still counts toward the peak
    peak2, _ = common.peak_extra_bytes(lambda: (torch.empty(2 * n) + 1).sum(), torch.device("cpu"))
    assert peak2 >= 2 * 4 * 2 * n


def test_case_layouts_follow_the_contract() -> None:
    w = ops_cases.Case("weight", (64, 16, 3, 3), "fp32", "channelwise", "forward")
    assert w.alpha_layout() == ((64, 1, 1, 1), 144)
    a = ops_cases.Case("activation", (128, 32, 16, 16), "fp32", "channelwise", "forward")
    assert a.alpha_layout() == ((32,), 256)
    e = ops_cases.Case("activation", (2, 16, 8, 8), "bf16", "elementwise", "fwd_bwd")
    assert e.alpha_layout() == ((16, 8, 8), 1)
    assert ops_cases.bytes_moved(e, 2) == (2 * 2048 + 1024) * 2 + (2048 + 1024) * 2
    assert ops_cases.weight_shape(2304) == (16, 16, 3, 3)
    assert math.prod(ops_cases.weight_shape(3000)) == 3000
    with pytest.raises(ValueError, match="size"):
        ops_cases.weight_shape(0)


def test_default_grid_covers_every_pass_for_layerwise_fp32() -> None:
    cases = ops_cases.default_cases()
    lw = {(c.numel, c.mode) for c in cases if c.kind == "weight" and c.alpha == "layerwise" and c.dtype == "fp32"}
    assert lw == {(n, m) for n in ops_cases.DEFAULT_SIZES for m in ops_cases.MODES}
    assert {c.alpha for c in cases} == set(ops_cases.ALPHA_MODES)
    assert {c.dtype for c in cases} == {"fp32", "bf16"}
    assert {c.shape for c in cases if c.kind == "activation"} == set(ops_cases.ACTIVATION_SHAPES)
    gpu = {c.numel for c in ops_cases.default_cases(device_type="cuda") if c.kind == "weight"}
    assert 8388608 in gpu  # the size the GPU targets are stated at
    full = ops_cases.default_cases(full=True)
    assert len(full) == (len(ops_cases.DEFAULT_SIZES) + 3) * 2 * 3 * 3


def test_entry_scripts_keep_the_names_of_their_parts() -> None:
    # run_all.py and other callers use these through bench_ops / bench_fixed_cost
    for name in ("Case", "default_cases", "weight_shape", "DEFAULT_SIZES", "MODES", "ALPHA_MODES", "DTYPES"):
        assert getattr(bench_ops, name) is getattr(ops_cases, name), name
    for name in ("OPS_COLUMNS", "SUMMARY_COLUMNS", "summary_rows", "table_rows", "markdown", "write_outputs"):
        assert getattr(bench_ops, name) is getattr(ops_report, name), name
    assert bench_fixed_cost.PIECES is fixed_cost_pieces.PIECES
    assert bench_fixed_cost.markdown is fixed_cost_report.markdown
    assert bench_fixed_cost.write_outputs is fixed_cost_report.write_outputs


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
