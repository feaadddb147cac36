"""scripts/sanitize.sh (ASan + UBSan run of the CPU kernel tests): cheap checks only.

The full run builds the extension with sanitizers (minutes), so the suite checks that the
script parses, refuses a missing interpreter with a clear message, and never builds into
the package directory; `scripts/sanitize.sh` itself is the real check.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from repo import ROOT

SCRIPT = ROOT / "scripts" / "sanitize.sh"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not found")


@needs_bash
def test_script_parses_and_is_executable():
    assert os.access(SCRIPT, os.X_OK)
    res = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


@needs_bash
def test_missing_interpreter_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHON=str(tmp_path / "no-python"))
    res = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 2
    assert "no-python not found (run scripts/setup_venv.sh first)" in res.stderr


def test_script_builds_outside_the_package_and_fails_on_reports():
    text = SCRIPT.read_text()
    assert '--build-lib "$WORK/pkg"' in text and "--inplace" not in text  # never the normal build
    assert "-fsanitize=address,undefined" in text and "-fno-omit-frame-pointer" in text
    assert "detect_leaks=0" in text and "halt_on_error=1:print_stacktrace=1" in text
    assert "runtime error:" in text and "ERROR: AddressSanitizer" in text  # reports fail the run
