"""The hot loop of one kernel's SASS and its instruction count per element, for
benchmarks/sass_report.py (whose docstring states the counting rule): basic blocks and edges from
the branches, back edges by a depth-first walk, natural loops, and the shortest path of one full
iteration of the innermost loop that holds a whole Philox call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from benchmarks.sass_tools import Instr

__all__ = ["PHILOX_M0", "Block", "LoopCount", "build_cfg", "back_edges", "natural_loop", "analyse_function"]

PHILOX_M0 = 0xD2511F53
# Immediates of the Philox multiply as cuobjdump prints them (signed or unsigned hex).
_M0_IMM = {hex(PHILOX_M0), "-" + hex((1 << 32) - PHILOX_M0)}


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
