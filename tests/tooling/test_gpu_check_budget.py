"""scripts/gpu_check.sh's time budget and labels (issue 24): margin on a first GPU run, true labels.

The whole run is capped at BUDGET (400 s): each stage gets its fixed limit or what the budget has
left less the kill grace, so a first run fits an 8-minute device slot with over 60 s to spare. A
stage that reaches its own limit is TIMEOUT "stopped at the stage's N s limit"; a command inside a
stage that hits its own shorter limit (a compute-sanitizer tool) is a FAIL saying so. Fast: the
runs below skip or simulate every stage.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from repo import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DEVICE_SLOT_S = 480  # the 8 minutes a first device run may take


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PNI_GPU_CHECK_")}
    full.update(PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), "--cpu-only"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )


def _rows(out: Path) -> dict[str, list[str]]:
    lines = (out / "summary.txt").read_text().splitlines()[2:-1]
    return {line.split()[0]: line.split(None, 6) for line in lines}


def test_budget_leaves_a_minute_of_an_eight_minute_slot():
    text = SCRIPT.read_text()
    budget = int(re.search(r"^BUDGET=(\d+)$", text, re.M).group(1))
    grace = int(re.search(r"^KILL_GRACE=(\d+)", text, re.M).group(1))
    limits = [int(x) for x in re.findall(r"^run_stage \w+ (\d+) ", text, re.M)]
    # every stage is clamped to the budget less the kill grace, so the run ends by BUDGET (+ a few
    # seconds of bookkeeping); the fixed limits alone fit it too
    assert budget + 10 <= DEVICE_SLOT_S - 60, budget
    assert sum(limits) + grace <= budget, (limits, budget)
    assert "stopped at the 60 s limit" not in text  # the old, untrue label


def test_stages_the_budget_cannot_hold_are_skipped_and_say_so(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, PNI_GPU_CHECK_BUDGET="14")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = _rows(out)
    assert list(rows) == ["env", "build", "tests", "bench", "sanitizer", "rest"]
    for row in rows.values():
        assert row[1] == "skipped", row
        assert re.search(r"only -?\d+ s of the (14 s )?budget left", row[6]), row
    assert int(re.search(r"overall: ok in (\d+) s", (out / "summary.txt").read_text()).group(1)) <= 14


def test_a_command_timing_out_inside_a_stage_is_not_labelled_a_stage_timeout(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, PNI_GPU_CHECK_ONLY="sanitizer", PNI_GPU_CHECK_FAIL_STAGE="sanitizer:124")
    assert proc.returncode == 1
    row = _rows(out)["sanitizer"]
    assert row[1] == "FAIL" and row[2] == "124", row
    assert "a command inside the stage timed out" in row[6] and "stage's" not in row[6], row
    assert "TIMEOUT" not in (out / "summary.txt").read_text()


def test_sanitizer_tools_have_their_own_limits_and_a_racecheck_selection():
    text = SCRIPT.read_text()
    body = text[text.index("stage_sanitizer() {") : text.index("stage_rest() {")]
    mem = int(re.search(r"k=\$SAN_K lim=(\d+)", body).group(1))
    race = int(re.search(r"k=\$SAN_RACE_K lim=(\d+)", body).group(1))
    stage = int(re.search(r"^run_stage sanitizer (\d+) ", text, re.M).group(1))
    assert mem + race + 2 * 2 <= stage, (mem, race, stage)  # both tools, each with its 2 s kill grace
    assert "stopped at its own ${lim} s limit" in body
