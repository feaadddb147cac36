"""scripts/gpu_check.sh, the one prepared GPU check, run here in its --cpu-only mode.

What is checked: every stage runs and is recorded in summary.txt with its status, exit code and
wall time; OUTDIR holds at most 8 plain files (what a device run can bring back); a failing
stage is reported, the stages after it still run, and the exit code says so; the fixed stage
limits fit the 400 s budget. No timing assertions: CI machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from repo import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["env", "build", "tests", "bench", "sanitizer", "rest"]
FILES = {
    "summary.txt",
    "env.txt",
    "build.log",
    "tests.log",
    "bench.log",
    "bench.tar.gz",
    "sanitizer.log",
    "tests_rest.log",
}
BUDGET_S = 400  # 6 min 40 s: over 60 s spare in an 8-minute device slot


def _run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PNI_GPU_CHECK_")}
    full_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )


def _summary(out: Path) -> tuple[dict[str, dict], str]:
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("# pni_fast scripts/gpu_check.sh") and lines[1].split()[:3] == ["stage", "status", "rc"]
    rows = {}
    for line in lines[2:-1]:
        name, status, rc, seconds, limit, log, *note = line.split(None, 6)
        rows[name] = dict(
            status=status, rc=int(rc), seconds=int(seconds), limit=int(limit), log=log, note=note[0] if note else ""
        )
    return rows, lines[-1]


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check") / "out"  # created by the script
    return out, _run(out, "--cpu-only")


@pytest.mark.slow  # the whole script end to end (~30-40 s): CI's slow tier
def test_cpu_only_run_passes_and_records_every_stage(cpu_run):
    out, proc = cpu_run
    assert proc.returncode == 0, _explain(proc)
    rows, overall = _summary(out)
    assert list(rows) == STAGES
    assert overall.startswith("overall: ok")
    expected = {"env": "ok", "build": "ok", "tests": "ok", "bench": "ok", "sanitizer": "skipped", "rest": "skipped"}
    assert {k: r["status"] for k, r in rows.items()} == expected
    for name, row in rows.items():
        assert row["rc"] == 0 and 0 <= row["seconds"] <= row["limit"] + 5, (name, row)
        assert row["status"] == "ok" or row["note"], (name, row)  # a skip always says why
        # the wall time of each stage is printed as it ends
        assert re.search(rf"\[gpu_check\] {name}: {row['status']} \(exit code 0\) in \d+ s", proc.stdout), name
    assert "cpu-only" in rows["build"]["note"]
    assert re.search(r"selection has (\d+) tests", rows["sanitizer"]["note"])
    assert int(re.search(r"selection has (\d+) tests", rows["sanitizer"]["note"]).group(1)) >= 5


@pytest.mark.slow  # the whole script end to end (~30-40 s): CI's slow tier
def test_outdir_holds_at_most_eight_plain_files(cpu_run):
    out, proc = cpu_run
    entries = list(out.iterdir())
    assert {p.name for p in entries} == FILES and len(entries) <= 8
    assert all(p.is_file() and not p.is_symlink() for p in entries)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in entries)


@pytest.mark.slow  # the whole script end to end (~30-40 s): CI's slow tier
def test_logs_hold_versions_tests_and_benchmarks(cpu_run):
    out, _ = cpu_run
    env = (out / "env.txt").read_text()
    for text in ("mode: cpu-only", "torch ", "triton ", "cuda available: False", "benchmark results folder"):
        assert text in env, text
    tests = (out / "tests.log").read_text()
    assert re.search(r"\d+ passed", tests) and "no CUDA device" in tests  # GPU tests skip with the reason
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = set(tar.getnames())
        for name in ("ops.json", "ops.md", "train.json", "train.md", "RESULTS.md"):
            assert f"cpu-only/{name}" in names, names
        ops = json.load(tar.extractfile("cpu-only/ops.json"))
    assert ops["records"] and ops["meta"]["device"]


@pytest.mark.slow  # the whole script end to end (~30-40 s): CI's slow tier
def test_failing_stage_is_reported_and_later_stages_still_run(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--cpu-only", PNI_GPU_CHECK_FAIL_STAGE="tests", PNI_GPU_CHECK_ONLY="env,tests,sanitizer")
    assert proc.returncode == 1, _explain(proc)
    rows, overall = _summary(out)
    assert list(rows) == STAGES
    assert rows["tests"]["status"] == "FAIL" and rows["tests"]["rc"] == 1
    assert "simulated failure" in (out / "tests.log").read_text()
    assert "last lines of tests.log" in proc.stdout
    assert rows["env"]["status"] == "ok"
    assert rows["sanitizer"]["status"] == "skipped" and "selection has" in rows["sanitizer"]["note"]  # it ran
    for name in ("build", "bench", "rest"):
        assert rows[name]["status"] == "skipped" and "PNI_GPU_CHECK_ONLY" in rows[name]["note"], name
    assert overall.startswith("overall: FAIL") and "failed: tests" in overall


def test_bad_usage_exits_2(tmp_path):
    for args in ([], ["--cpu-only"], [str(tmp_path / "a"), str(tmp_path / "b")], [str(tmp_path), "--fast"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "usage" in proc.stderr, (args, proc.stderr)


def test_stage_limits_fit_the_budget():
    """The fixed limits leave the whole run (build to sanitizer, then `rest` in what is left) within 400 s."""
    text = SCRIPT.read_text()
    limits = {name: int(limit) for name, limit in re.findall(r"^run_stage (\w+) (\d+) ", text, re.M)}
    assert list(limits) == STAGES[:-1]
    assert sum(limits.values()) <= BUDGET_S, limits
    assert re.search(rf"^BUDGET={BUDGET_S}$", text, re.M)
    assert 'run_stage rest "$LEFT"' in text
