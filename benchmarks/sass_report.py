"""SASS instructions per element of the CUDA kernels' hot loops, without a GPU.

Compiles ``csrc/cuda/perturb_cuda.cu`` for one architecture (``nvcc -cubin -arch=sm_90``, torch's
include paths, as tests/test_cuda_compile.py does; never fast math), disassembles it with
``cuobjdump -sass`` and, for every kernel, finds the hot loop and counts its instructions.

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
the numbers of an older version are taken. Output: a Markdown table on stdout, ``--md FILE`` /
``--json FILE``, or ``--out DIR`` (writes ``DIR/sass.md`` and ``DIR/sass.json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
PHILOX_M0 = 0xD2511F53
# Immediates of the Philox multiply as cuobjdump prints them (signed or unsigned hex).
_M0_IMM = {hex(PHILOX_M0), "-" + hex((1 << 32) - PHILOX_M0)}
# Opcodes (first dot-part) that are forbidden in the accurate-math kernels.
# (accurate logf/sincosf/sqrtf use none of them; sqrtf's MUFU.RSQ is refined to a correctly rounded result)
FAST_MATH_MUFU = ("MUFU.SIN", "MUFU.COS", "MUFU.LG2", "MUFU.EX2")

__all__ = ["find_tool", "compile_cubin", "disassemble", "analyse_function", "report", "main"]


# ---------------------------------------------------------------------------
# Tools and compilation
# ---------------------------------------------------------------------------


def find_tool(name: str) -> Optional[str]:
    """Path of a CUDA binary tool (nvcc, cuobjdump): PATH, CUDA_HOME, /usr/local/cuda, or the copies
    that the triton and nvidia-cuda-* wheels ship in site-packages."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.path.join(os.environ.get(v, ""), "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs.append("/usr/local/cuda/bin")
    site = sysconfig.get_paths()["purelib"]
    dirs += [os.path.join(site, "triton", "backends", "nvidia", "bin")]
    dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin")))
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def nvcc_command(src: Path, out: Path, arch: str, stub: Path) -> list[str]:
    """nvcc -cubin for one .cu file against torch's headers (the flags of tests/test_cuda_compile.py)."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (no CUDA toolkit)")
    cmd = [nvcc, "-std=c++20", "-cubin", f"-arch={arch}", str(src), "-o", str(out), "-Xptxas", "-v"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [f"-I{sysconfig.get_paths()['include']}", f"-I{stub}"]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return cmd  # never --use_fast_math (design.md section 3)


def compile_cubin(csrc: Path, workdir: Path, arch: str = "sm_90") -> tuple[Path, str]:
    """Compiles csrc/cuda/perturb_cuda.cu into workdir; returns (cubin, ptxas -v log)."""
    stub = workdir / "stub"
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"  # missing from CPU torch builds
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.write_text("#pragma once\n")
    cubin = workdir / "perturb_cuda.cubin"
    cmd = nvcc_command(csrc / "cuda" / "perturb_cuda.cu", cubin, arch, stub)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return cubin, proc.stdout + proc.stderr


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """{mangled name: registers, stack, spill_stores, spill_loads} from ptxas -v."""
    res: dict[str, dict[str, int]] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = res.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return res


# ---------------------------------------------------------------------------
# Disassembly and control flow
# ---------------------------------------------------------------------------


@dataclass
class Instr:
    addr: int
    pred: str  # guard predicate ("" when none)
    op: str  # full opcode with modifiers, e.g. "IMAD.WIDE.U32"
    args: str

    @property
    def text(self) -> str:
        return f"{self.pred + ' ' if self.pred else ''}{self.op} {self.args}".strip()


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def disassemble(cubin: Path) -> dict[str, list[Instr]]:
    """{mangled kernel name: instructions} from cuobjdump -sass."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or the triton wheel's copy)")
    out = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, timeout=300, check=True).stdout
    funcs: dict[str, list[Instr]] = {}
    cur: Optional[list[Instr]] = None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _LINE.match(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return funcs


def _branch_target(ins: Instr) -> Optional[int]:
    m = re.search(r"(?:^|[ ,])(0x[0-9a-f]+)\s*$", ins.args)
    return int(m.group(1), 16) if m else None


def _conditional(ins: Instr) -> bool:
    # a guard predicate other than PT, or a predicate operand (BRA P1, target)
    return (ins.pred not in ("", "@PT")) or bool(re.match(r"!?P[0-6]\s*,", ins.args))


@dataclass
class Block:
    start: int
    instrs: list[Instr]
    succ: list[int] = field(default_factory=list)


def build_cfg(instrs: list[Instr]) -> dict[int, Block]:
    if not instrs:
        return {}
    leaders = {instrs[0].addr}
    for i, ins in enumerate(instrs):
        base = ins.op.split(".")[0]
        if base in ("BRA", "EXIT", "RET", "BREAK", "JMP", "BRX", "CALL"):
            if base in ("BRA", "JMP", "BREAK"):
                t = _branch_target(ins)
                if t is not None:
                    leaders.add(t)
            if i + 1 < len(instrs):
                leaders.add(instrs[i + 1].addr)
    blocks: dict[int, Block] = {}
    cur: list[Instr] = []
    for ins in instrs:
        if ins.addr in leaders and cur:
            blocks[cur[0].addr] = Block(cur[0].addr, cur)
            cur = []
        cur.append(ins)
    if cur:
        blocks[cur[0].addr] = Block(cur[0].addr, cur)
    starts = sorted(blocks)
    nxt = {s: (starts[i + 1] if i + 1 < len(starts) else None) for i, s in enumerate(starts)}
    for s, b in blocks.items():
        last = b.instrs[-1]
        base = last.op.split(".")[0]
        cond = _conditional(last)
        fall = nxt[s]
        if base in ("BRA", "JMP"):
            t = _branch_target(last)
            if t is not None and t in blocks:
                b.succ.append(t)
            if cond and fall is not None:
                b.succ.append(fall)
        elif base in ("EXIT", "RET", "BREAK"):
            if base == "BREAK":  # leaves a loop: continues at the matching BSYNC, modelled as fall-through
                if fall is not None:
                    b.succ.append(fall)
            elif cond and fall is not None:
                b.succ.append(fall)
        elif fall is not None:
            b.succ.append(fall)
    return blocks


def back_edges(blocks: dict[int, Block], entry: int) -> set[tuple[int, int]]:
    """Edges to a block on the depth-first stack."""
    result: set[tuple[int, int]] = set()
    state: dict[int, int] = {}  # 1 on stack, 2 done
    stack = [(entry, iter(blocks[entry].succ))]
    state[entry] = 1
    while stack:
        node, it = stack[-1]
        for s in it:
            if state.get(s) == 1:
                result.add((node, s))
            elif s not in state:
                state[s] = 1
                stack.append((s, iter(blocks[s].succ)))
                break
        else:
            state[node] = 2
            stack.pop()
    return result


def natural_loop(blocks: dict[int, Block], header: int, latches: list[int]) -> set[int]:
    preds: dict[int, list[int]] = {s: [] for s in blocks}
    for s, b in blocks.items():
        for t in b.succ:
            preds[t].append(s)
    body = {header}
    work = [x for x in latches if x != header]
    body.update(work)
    while work:
        n = work.pop()
        for p in preds[n]:
            if p not in body:
                body.add(p)
                work.append(p)
    return body


def _is_m0(ins: Instr) -> bool:
    return ins.op.startswith(("IMAD.WIDE.U32", "IMAD.HI.U32")) and any(
        re.search(rf"(?<![0-9a-fx]){re.escape(c)}(?![0-9a-f])", ins.args) for c in _M0_IMM
    )


def _global_bytes(ins: Instr, kind: str) -> int:
    """Bytes moved by a global load (kind 'LDG') or store ('STG')."""
    if not ins.op.startswith(kind):
        return 0
    for part, n in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if part in ins.op:
            return n
    return 4


@dataclass
class LoopCount:
    header: int
    path_instrs: int  # instructions on the counted iteration path
    quads: int  # Philox calls on that path (4 elements each)
    per_element: float
    static_instrs: int  # all instructions of the loop's blocks
    static_per_element: float
    mufu: list[str]  # MUFU opcodes on the path
    memory: list[str]  # global loads/stores on the path (e.g. LDG.E.128, STG.E.128)
    calls: int  # CALLs anywhere in the loop (slow paths of sqrtf, integer division, ...)
    path_blocks: list[int]


def analyse_function(instrs: list[Instr], elem_bytes: int) -> Optional[LoopCount]:
    """The hot loop of one kernel (see the module docstring), or None when it has none."""
    blocks = build_cfg(instrs)
    if not blocks:
        return None
    entry = instrs[0].addr
    backs = back_edges(blocks, entry)
    by_header: dict[int, list[int]] = {}
    for src, dst in backs:
        by_header.setdefault(dst, []).append(src)
    best = None
    for header, latches in by_header.items():
        body = natural_loop(blocks, header, latches)
        m0 = sum(_is_m0(i) for b in body for i in blocks[b].instrs)
        if m0 >= 10 and (best is None or len(body) < len(best[1])):
            best = (header, body, latches)
    if best is None:
        return None
    header, body, latches = best
    stores = any(_global_bytes(i, "STG") for b in body for i in blocks[b].instrs)
    kind = "STG" if stores else "LDG"
    # DP over the loop's DAG (back edges removed): state (block, bytes moved, M0 multiplies) -> fewest
    # instructions from the header through the end of the block, with the path that achieved it.
    order = _topo(blocks, body, header, backs)
    cap_b, cap_m = 1024, 200
    best_state: dict[tuple[int, int, int], tuple[int, tuple[int, ...]]] = {}

    by_addr = {i.addr: k for k, i in enumerate(instrs)}

    def callee_len(ins: Instr) -> int:
        """Instructions of a called subroutine, from its entry to the first RET."""
        k = by_addr.get(_branch_target(ins) or -1)
        if k is None:
            return 0
        n = 0
        for j in range(k, len(instrs)):
            n += 1
            if instrs[j].op.startswith("RET"):
                break
        return n

    def block_stats(b: int) -> tuple[int, int, int]:
        ins = blocks[b].instrs
        calls = sum(callee_len(i) for i in ins if i.op.startswith("CALL"))
        return len(ins) + calls, sum(_global_bytes(i, kind) for i in ins), sum(_is_m0(i) for i in ins)

    n0, b0, m0 = block_stats(header)
    best_state[(header, min(b0, cap_b), min(m0, cap_m))] = (n0, (header,))
    for node in order:
        for (nd, by, mu), (cnt, path) in list(best_state.items()):
            if nd != node:
                continue
            for s in blocks[node].succ:
                if s not in body or (node, s) in backs:
                    continue
                n1, b1, m1 = block_stats(s)
                key = (s, min(by + b1, cap_b), min(mu + m1, cap_m))
                val = (cnt + n1, path + (s,))
                if key not in best_state or val[0] < best_state[key][0]:
                    best_state[key] = val
    result = None
    for (nd, by, mu), (cnt, path) in best_state.items():
        if nd not in latches:
            continue
        quads = mu // 10
        if quads < 1 or by < 4 * quads * elem_bytes:
            continue
        if result is None or cnt / quads < result[0] / result[1]:
            result = (cnt, quads, path)
    if result is None:
        return None
    cnt, quads, path = result
    static = sum(len(blocks[b].instrs) for b in body)
    static_quads = max(1, sum(_is_m0(i) for b in body for i in blocks[b].instrs) // 10)
    mufu = sorted({i.op for b in path for i in blocks[b].instrs if i.op.startswith("MUFU")})
    memory = sorted({i.op for b in path for i in blocks[b].instrs if i.op.startswith(("LDG", "STG"))})
    calls = sum(i.op.startswith("CALL") for b in body for i in blocks[b].instrs)
    return LoopCount(
        header, cnt, quads, cnt / (4 * quads), static, static / (4 * static_quads), mufu, memory, calls, list(path)
    )


def _topo(blocks: dict[int, Block], body: set[int], header: int, backs: set[tuple[int, int]]) -> list[int]:
    indeg = {b: 0 for b in body}
    for b in body:
        for s in blocks[b].succ:
            if s in body and (b, s) not in backs:
                indeg[s] += 1
    order, ready = [], [b for b in body if indeg[b] == 0]
    while ready:
        n = ready.pop()
        order.append(n)
        for s in blocks[n].succ:
            if s in body and (n, s) not in backs:
                indeg[s] -= 1
                if indeg[s] == 0:
                    ready.append(s)
    return order


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


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


def report(csrc: Path, arch: str = "sm_90", workdir: Optional[Path] = None) -> dict[str, Any]:
    """Compiles, disassembles and counts; returns the JSON-able result."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pni_sass_")
        workdir = Path(tmp.name)
    try:
        cubin, log = compile_cubin(csrc, workdir, arch)
        res_usage = parse_ptxas(log)
        funcs = disassemble(cubin)
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
        "nvcc": _version(find_tool("nvcc")),
        "cuobjdump": _version(find_tool("cuobjdump")),
    }


def _version(tool: Optional[str]) -> str:
    if tool is None:
        return "absent"
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "?"


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
