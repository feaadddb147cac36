"""SASS instructions per element of the CUDA kernels' hot loops, without a GPU.

Compiles the perturb-family kernels (``csrc/cuda/perturb_cuda.cu``, ``perturb_alpha_grad_cuda.cu``,
``rng_cuda.cu``) for one architecture (``nvcc -c -arch=sm_90``, torch's include paths, as
tests/backends/test_cuda_compile.py does; never fast math), disassembles them with ``cuobjdump -sass`` and,
for every kernel, finds the hot loop and counts its instructions. The parts: benchmarks/sass_tools.py
(tools, compilation, disassembly), benchmarks/sass_loops.py (control flow and the counting rule
below); this file names the hot loops and writes the report.

How a loop is counted (a static count; no GPU, no profile):

* basic blocks and edges from the branches (``BRA``, ``EXIT``, ``RET``, ``BREAK``); back edges
  from a depth-first walk; the hot loop is the innermost natural loop that holds a whole Philox
  call (at least ten multiplies by 0xD2511F53);
* one iteration is a path from the loop head to one of its back edges (inner loops counted once).
  The counted path is the shortest one that still does a full iteration's work: it runs all the
  Philox calls it holds (``quads`` = multiplies / 10) and moves all their elements through global
  memory (stores of ``4 * quads`` elements for kernels that store in the loop, else loads of them).
  That excludes cold code by construction: the large-argument path of the accurate sincosf (never
  taken: the argument is below 2*pi), the scalar tail of an unaligned tensor, rarely taken
  refills. Predicated instructions on the path count as issued;
* ``per element`` = path instructions / (4 * quads). ``static`` is every instruction of the loop's
  blocks (cold paths included), for comparison.

Registers, stack and spills come from ``ptxas -v``. ``--csrc DIR`` points at another copy of the
sources (laid out like ``csrc/``: ``DIR/cuda/perturb_cuda.cu``, ``DIR/philox.h``, ...), which is how
the numbers of an older version are taken (whichever of the three .cu files it has are compiled).
Output: a Markdown table on stdout, ``--md FILE`` / ``--json FILE``, or ``--out DIR`` (writes
``DIR/sass.md`` and ``DIR/sass.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.sass_loops import analyse_function  # noqa: E402
from benchmarks.sass_tools import (  # noqa: E402
    compile_object,
    compile_objects,
    disassemble,
    find_tool,
    parse_ptxas,
    tool_version,
)

# Opcodes (first dot-part) that are forbidden in the accurate-math kernels.
# (accurate logf/sincosf/sqrtf use none of them; sqrtf's MUFU.RSQ is refined to a correctly rounded result)
FAST_MATH_MUFU = ("MUFU.SIN", "MUFU.COS", "MUFU.LG2", "MUFU.EX2")

__all__ = ["find_tool", "compile_object", "disassemble", "analyse_function", "report", "main"]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    return {n: (lines[i] if i < len(lines) else n) for i, n in enumerate(names)}


def short_name(demangled: str) -> str:
    """'void pni_fast::(anonymous namespace)::perturb_kernel<float, int, 0>(...)' -> 'perturb_kernel<float, int, 0>'."""
    s = re.sub(r"pni_fast::|\(anonymous namespace\)::|cuda_impl::|c10::", "", demangled)
    depth, end = 0, len(s)
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    return s[:end].replace("void ", "").strip()


def _elem_bytes(name: str) -> int:
    m = re.search(r"<\s*(float|double|Half|BFloat16)", name)
    return {"float": 4, "double": 8, "Half": 2, "BFloat16": 2}.get(m.group(1), 4) if m else 4


# Named hot loops: (label, pattern on the short name; the first kernel that matches is used).
# The kernels' template arguments are <T, index type, FwdKind> (0 layerwise, 1 channelwise,
# 2 list); before the index/kind templates there was one perturb_kernel<T> for all three.
HOT_LOOPS = [
    ("fp32 forward (layerwise alpha)", r"^perturb_kernel<float(, int, 0)?>$"),
    ("fp32 forward (channelwise alpha)", r"^perturb_kernel<float(, int, 1)?>$"),
    ("fp32 forward, 64-bit index", r"^perturb_kernel<float(, long, 0)?>$"),
    ("fp16 forward (layerwise alpha)", r"^perturb_kernel<Half(, int, 0)?>$"),
    ("multi-tensor fp32 forward", r"^perturb_kernel<float(, int, 2)?>$"),
    ("fp32 alpha-grad stage 1", r"^alpha_grad_partials_kernel<float(, int)?>$"),
    ("fp16 alpha-grad stage 1", r"^alpha_grad_partials_kernel<Half(, int)?>$"),
]


def hot_loops(kernels: list[dict[str, Any]]) -> dict[str, str]:
    """{label: kernel} of HOT_LOOPS: the first kernel with a hot loop whose name matches."""
    hot = {}
    for label, pat in HOT_LOOPS:
        for k in kernels:
            if re.search(pat, k["kernel"]) and "loop" in k:
                hot[label] = k["kernel"]
                break
    return hot


def report(
    csrc: Path,
    arch: str = "sm_90",
    workdir: Optional[Path] = None,
    compiled: Optional[tuple[list[Path], str]] = None,
) -> dict[str, Any]:
    """Compiles, disassembles and counts; returns the JSON-able result. ``compiled``: objects already
    built for ``arch`` with their ptxas -v log (tests/backends/test_cuda_compile.py compiles each file once)."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pni_sass_")
        workdir = Path(tmp.name)
    try:
        objects, log = compiled if compiled is not None else compile_objects(csrc, workdir, arch)
        res_usage = parse_ptxas(log)
        funcs = {}
        for obj in objects:
            funcs.update(disassemble(obj))
    finally:
        if tmp is not None:
            tmp.cleanup()
    names = demangle(sorted(funcs))
    kernels = []
    for mangled in sorted(funcs, key=lambda n: short_name(names[n])):
        short = short_name(names[mangled])
        instrs = funcs[mangled]
        loop = analyse_function(instrs, _elem_bytes(short))
        fast = sorted({i.op for i in instrs if i.op.startswith(FAST_MATH_MUFU)})
        entry = {"kernel": short, "instructions": len(instrs), "fast_math_ops": fast, **res_usage.get(mangled, {})}
        if loop is not None:
            entry["loop"] = {k: v for k, v in asdict(loop).items() if k != "path_blocks"}
        kernels.append(entry)
    hot = hot_loops(kernels)
    return {
        "arch": arch,
        "csrc": str(csrc),
        "kernels": kernels,
        "hot_loops": hot,
        "nvcc": tool_version(find_tool("nvcc")),
        "cuobjdump": tool_version(find_tool("cuobjdump")),
    }


def _row(k: dict[str, Any]) -> list[str]:
    loop = k.get("loop")
    spills = f"{k.get('spill_stores', '?')}/{k.get('spill_loads', '?')}"
    if loop is None:
        return [k["kernel"], "-", "-", "-", "-", str(k.get("registers", "?")), str(k.get("stack", "?")), spills]
    return [
        k["kernel"],
        f"{loop['per_element']:.1f}",
        f"{loop['path_instrs']}/{4 * loop['quads']}",
        f"{loop['static_per_element']:.1f}",
        ",".join(m.replace("MUFU.", "") for m in loop["mufu"]) or "-",
        str(k.get("registers", "?")),
        str(k.get("stack", "?")),
        spills,
    ]


def markdown(result: dict[str, Any], baseline: Optional[dict[str, Any]] = None) -> str:
    by_name = {k["kernel"]: k for k in result["kernels"]}
    lines = [f"## SASS per element ({result['arch']})", ""]
    lines += [
        f"nvcc: {result['nvcc']}; cuobjdump: {result['cuobjdump']}. Counting rule: benchmarks/sass_report.py "
        "docstring (shortest path of one full iteration of the hot loop, cold paths excluded).",
        "",
    ]
    head = ["hot loop", "kernel", "SASS / element", "registers", "spills (st/ld bytes)"]
    if baseline is not None:
        head = ["hot loop", "kernel", "SASS / element", "before", "registers", "before", "spills", "before"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _ in HOT_LOOPS:
        name = result["hot_loops"].get(label)
        if name is None:
            continue
        k = by_name[name]
        row = [label, f"`{name}`", f"{k['loop']['per_element']:.1f}"]
        if baseline is not None:
            bname = hot_loops(baseline["kernels"]).get(label)
            b = next((x for x in baseline["kernels"] if x["kernel"] == bname), None)
            row += [
                f"{b['loop']['per_element']:.1f}" if b else "-",
                str(k.get("registers", "?")),
                str(b.get("registers", "?")) if b else "-",
                f"{k.get('spill_stores', '?')}/{k.get('spill_loads', '?')}",
                f"{b.get('spill_stores', '?')}/{b.get('spill_loads', '?')}" if b else "-",
            ]
        else:
            row += [str(k.get("registers", "?")), f"{k.get('spill_stores', '?')}/{k.get('spill_loads', '?')}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "All kernels:",
        "",
        "| kernel | SASS / element | path instrs / elements | static loop / element | MUFU on path | registers"
        " | stack bytes | spills st/ld |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_row(k)) + " |" for k in result["kernels"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csrc", type=Path, default=ROOT / "csrc", help="sources to compile (a copy laid out like csrc/)")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--json", type=Path, help="write the full result as JSON")
    p.add_argument("--md", type=Path, help="write the Markdown table")
    p.add_argument("--out", type=Path, help="directory: writes sass.md and sass.json")
    p.add_argument("--baseline", type=Path, help="a JSON of an earlier run, shown as 'before' columns")
    args = p.parse_args(argv)
    for tool in ("nvcc", "cuobjdump"):
        if find_tool(tool) is None:
            print(f"sass_report: {tool} not found; nothing to report", file=sys.stderr)
            return 2
    result = report(args.csrc, args.arch)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if baseline is not None:
        result["baseline"] = {
            "csrc": baseline.get("csrc"),
            "hot_loops": baseline.get("hot_loops"),
            "kernels": baseline.get("kernels"),
        }
    md = markdown(result, baseline)
    print(md)
    outputs = [(args.json, None), (args.md, md)]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        outputs += [(args.out / "sass.json", None), (args.out / "sass.md", md)]
    for path, text in outputs:
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text is not None else json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
