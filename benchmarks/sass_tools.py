"""The CUDA tools behind benchmarks/sass_report.py: finding nvcc and cuobjdump, compiling the
perturb-family kernels to cubins (torch's include paths, never fast math), reading ptxas's
resource lines and the ``cuobjdump -sass`` disassembly.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = [
    "KERNEL_SOURCES",
    "Instr",
    "find_tool",
    "nvcc_command",
    "compile_cubin",
    "compile_cubins",
    "parse_ptxas",
    "disassemble",
    "tool_version",
]

# The .cu files (under csrc/cuda) whose kernels the report counts: the perturb family (sigma has no
# Philox loop). An older copy of the sources (--csrc) may lack some: perturb_cuda.cu once held them all.
KERNEL_SOURCES = ("perturb_cuda.cu", "perturb_alpha_grad_cuda.cu", "rng_cuda.cu")


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


def compile_cubin(csrc: Path, workdir: Path, arch: str = "sm_90", source: str = "perturb_cuda.cu") -> tuple[Path, str]:
    """Compiles csrc/cuda/<source> into workdir; returns (cubin, ptxas -v log)."""
    stub = workdir / "stub"
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"  # missing from CPU torch builds
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.write_text("#pragma once\n")
    cubin = workdir / (Path(source).stem + ".cubin")
    cmd = nvcc_command(csrc / "cuda" / source, cubin, arch, stub)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return cubin, proc.stdout + proc.stderr


def compile_cubins(csrc: Path, workdir: Path, arch: str = "sm_90") -> tuple[list[Path], str]:
    """Compiles every KERNEL_SOURCES file present in csrc/cuda; returns (cubins, ptxas -v logs)."""
    sources = [s for s in KERNEL_SOURCES if (csrc / "cuda" / s).is_file()]
    if not sources:
        raise FileNotFoundError(f"none of {', '.join(KERNEL_SOURCES)} under {csrc / 'cuda'}")
    cubins, logs = [], []
    for source in sources:
        cubin, log = compile_cubin(csrc, workdir, arch, source)
        cubins.append(cubin)
        logs.append(log)
    return cubins, "\n".join(logs)


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


def tool_version(tool: Optional[str]) -> str:
    if tool is None:
        return "absent"
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "?"
