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
    "compile_object",
    "compile_objects",
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
    """nvcc -c for one .cu file against torch's headers: an object with host code and the ``arch`` SASS
    inside (cuobjdump reads it), so one compile serves both the compile check and the SASS count."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (no CUDA toolkit)")
    cmd = [nvcc, "-std=c++20", "-c", f"-arch={arch}", str(src), "-o", str(out), "-Xptxas", "-v"]
    cmd += ["-Xcompiler", "-fPIC"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [f"-I{sysconfig.get_paths()['include']}", f"-I{stub}"]
    # the flags torch's CUDAExtension adds (half operators off, relaxed constexpr)
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return cmd  # never --use_fast_math (design.md section 3)


def compile_object(src: Path, workdir: Path, arch: str = "sm_90") -> tuple[Path, str]:
    """Compiles one .cu file into workdir; returns (object, ptxas -v log). Raises with nvcc's output."""
    stub = workdir / "stub"
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"  # missing from CPU torch builds
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.write_text("#pragma once\n")
    obj = workdir / (Path(src).stem + ".o")
    cmd = nvcc_command(Path(src), obj, arch, stub)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src}:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return obj, proc.stdout + proc.stderr


def compile_objects(csrc: Path, workdir: Path, arch: str = "sm_90") -> tuple[list[Path], str]:
    """Compiles every KERNEL_SOURCES file present in csrc/cuda; returns (objects, ptxas -v logs)."""
    sources = [s for s in KERNEL_SOURCES if (csrc / "cuda" / s).is_file()]
    if not sources:
        raise FileNotFoundError(f"none of {', '.join(KERNEL_SOURCES)} under {csrc / 'cuda'}")
    objects, logs = [], []
    for source in sources:
        obj, log = compile_object(csrc / "cuda" / source, workdir, arch)
        objects.append(obj)
        logs.append(log)
    return objects, "\n".join(logs)


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
    """{mangled kernel name: instructions} from cuobjdump -sass (of a cubin or an object holding one)."""
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
