"""Include the SASS-per-element report of ``benchmarks/sass_report.py`` when that script exists.

The script belongs to another part of the project and may be absent; then the section is skipped
with the reason printed. When present it is run as ``python benchmarks/sass_report.py --out DIR``
and its table is taken from ``DIR/sass.md`` if it writes one, else from the Markdown table lines it
prints. It compiles the CUDA kernels with nvcc (a minute or more), so a quick run passes it
``--quick`` when its ``--help`` lists that option and otherwise skips it, saying why. A report
that says it has "nothing to report" (nvcc or cuobjdump missing) is a skip, not an error.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common

__all__ = ["SCRIPT", "run"]

SCRIPT = common.REPO_ROOT / "benchmarks" / "sass_report.py"


def run(
    out_dir: Path, *, quick: bool = False, timeout: float = 300, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """``{"status": "ok"|"skipped"|"error", "reason", "markdown"}``; writes ``sass.md`` into ``out_dir`` when ok."""
    if not SCRIPT.exists():
        reason = f"skipped: {SCRIPT.relative_to(common.REPO_ROOT)} does not exist (no SASS report in this checkout)"
        log(f"[sass] {reason}")
        return {"status": "skipped", "reason": reason, "markdown": f"## SASS per element\n\n{reason}\n"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out_dir)]
    try:
        if quick:
            helptext = subprocess.run(
                [sys.executable, str(SCRIPT), "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=common.REPO_ROOT,
            ).stdout
            if "--quick" not in helptext:
                reason = (
                    f"skipped in --quick: {SCRIPT.name} compiles the CUDA kernels (no --quick option); "
                    "run without --quick"
                )
                log(f"[sass] {reason}")
                return {"status": "skipped", "reason": reason, "markdown": f"## SASS per element\n\n{reason}\n"}
            cmd.append("--quick")
        out_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.REPO_ROOT)
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"error: {' '.join(cmd[1:])} failed: {type(exc).__name__}: {exc}"[:400]
        log(f"[sass] {reason}")
        return {"status": "error", "reason": reason, "markdown": f"## SASS per element\n\n{reason}\n"}
    shown = "python " + " ".join(str(Path(c).relative_to(common.REPO_ROOT)) if c == str(SCRIPT) else c for c in cmd[1:])
    if proc.returncode != 0 and "nothing to report" in proc.stderr:
        reason = f"skipped: `{shown}` says: {proc.stderr.strip()[-300:]}"
        log(f"[sass] {reason}")
        return {"status": "skipped", "reason": reason, "markdown": f"## SASS per element\n\n{reason}\n"}
    if proc.returncode != 0:
        reason = f"error: `{shown}` exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-400:].strip()}"
        log(f"[sass] {reason}")
        return {"status": "error", "reason": reason, "markdown": f"## SASS per element\n\n{reason}\n"}
    md_file = out_dir / "sass.md"
    if md_file.exists():
        body = md_file.read_text()
    else:
        table = [ln for ln in proc.stdout.splitlines() if ln.lstrip().startswith("|")]
        if not table:
            reason = f"error: `{shown}` wrote no sass.md and printed no Markdown table"
            log(f"[sass] {reason}")
            return {"status": "error", "reason": reason, "markdown": f"## SASS per element\n\n{reason}\n"}
        body = "## SASS per element\n\n" + "\n".join(table) + "\n"
        md_file.write_text(body)
    log(f"[sass] included the table of `{shown}`")
    return {"status": "ok", "reason": None, "markdown": body + f"\nProduced by `{shown}`.\n"}
