"""The fixed-cost benchmark's report: the Markdown (side-by-side ratios, then the per-piece breakdown in
CPU and wall time) and the ``fixed_cost.json`` / ``fixed_cost.md`` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from benchmarks import common
from benchmarks.fixed_cost_pieces import PIECES

__all__ = ["markdown", "write_outputs"]


def _spread(r: dict[str, Any], key: str) -> Optional[str]:
    return f"{r[key + '_min']:.2f}-{r[key + '_max']:.2f}" if r["status"] == "ok" else r.get("reason")


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    comp = [
        dict(
            r, shape_text="x".join(map(str, r["shape"])), spread=_spread(r, "ratio"), cpu_spread=_spread(r, "cpu_ratio")
        )
        for r in records
        if r["kind"] == "compare"
    ]
    sizes = list(meta["sizes"])
    pieces = {
        (r["numel"], r["group"], r["piece"]): r for r in records if r["kind"] == "breakdown" and r["status"] == "ok"
    }
    backend = next((r["backend"] for r in records if r["kind"] == "breakdown" and r.get("backend")), "-")

    def table(stat: str) -> str:
        rows = []
        for group, piece, code in PIECES:
            row: dict[str, Any] = {"group": group, "piece": piece, "code": f"`{code}`"}
            for n in sizes:
                r = pieces.get((n, group, piece))
                row[str(n)] = r[stat] if r else None
            rows.append(row)
        cols = [("group", "part"), ("piece", "piece")] + [(str(n), f"{n} el. us") for n in sizes]
        return common.markdown_table(rows, cols + [("code", "what is timed")])

    errors = [f"- {r['numel']}: {r['reason']}" for r in records if r["kind"] == "breakdown" and r["status"] != "ok"]
    lines = [
        f"## Per-call fixed cost of `noisy_weight`, {meta['device']}",
        "",
        f"Command: `{command}`  ",
        f"torch {meta['torch']}, CUDA {meta['cuda']}{common.driver_text(meta)}, {meta['threads']} threads, "
        f"{meta['date_utc']}, commit {meta['git_commit']}  ",
        f"Load average (1/5/15 min): {meta['load_avg_1_5_15']} at start, {meta.get('load_avg_end_1_5_15')} at end "
        f"({meta['cpu_count']} CPUs)  ",
        "Layerwise alpha, fp32, weight and alpha require grad. pni_fast and the reference "
        "(`std().item()` + stored `normal_`) run side by side in one process, interleaved in "
        f"{meta['rounds']} rounds (order rotated each round; a block of calls lasts "
        f"~{meta['block_target_s'] * 1e3:.0f} ms). "
        "**Ratio = reference / pni_fast per round, median of rounds: >= 1.0x means pni_fast is faster.** "
        "Wall time is what a caller waits; CPU time (`time.process_time`) leaves out the time this process "
        "waited for a core, so it is the figure to trust when the load average is high.",
        "",
        common.markdown_table(
            comp,
            [
                ("numel", "elements"),
                ("shape_text", "shape"),
                ("mode", "pass"),
                ("pni_fast_us", "pni_fast us"),
                ("reference_us", "reference us"),
                ("ratio", "ratio (x)"),
                ("spread", "ratio min-max"),
                ("pni_fast_cpu_us", "pni_fast CPU us"),
                ("reference_cpu_us", "reference CPU us"),
                ("cpu_ratio", "CPU-time ratio (x)"),
                ("cpu_spread", "CPU ratio min-max"),
            ],
        ),
        "",
        f"### Where the time goes: CPU time, us per call (median of {meta['breakdown_blocks']} tight-loop blocks, "
        f"pieces interleaved; backend {backend})",
        "",
        "Each piece is timed alone with the arguments the public function passes it. `autograd` = "
        "`autograd.apply(PerturbFn, ...)` minus the raw op; `rest` = total minus the pieces (for the "
        "forward: glue between them); backward total = forward+backward minus forward. Derived rows can be "
        "slightly negative from timing noise.",
        "",
        table("cpu_median_us"),
        "",
        "### The same, wall time (us per call, median of blocks)",
        "",
        table("median_us"),
        "",
    ]
    if errors:
        lines += ["Breakdown errors:", *errors, ""]
    return "\n".join(lines)


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "fixed_cost.json", meta, records)
    (out_dir / "fixed_cost.md").write_text(markdown(meta, records, command))
