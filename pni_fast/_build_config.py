"""The one build configuration of the compiled kernels (``pni_fast._C``).

Used by both builds of the same ``csrc/`` sources: ahead of time by ``setup.py`` (which loads
this file by path, without importing the pni_fast package or torch) and just in time by
``pni_fast/_ext.py``. Source lists, compiler and linker flags, the CUDA decision and the
build stamp live here only, so the two builds cannot drift apart.

Pure standard library; nothing here imports torch.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
from typing import Optional

# Written next to the built library: the torch it was compiled against. _ext.py refuses to
# load a library whose stamp names another torch (the C++ ABI is not stable across versions).
STAMP_NAME = "_C_build.json"


def env_flag(name: str) -> bool:
    """True if the environment variable `name` is 1/true/yes/on (case-insensitive)."""
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def extra_flags(name: str) -> list[str]:
    """Flags from the environment variable `name` (PNI_FAST_EXTRA_CXXFLAGS / _LDFLAGS), shell-split."""
    return shlex.split(os.environ.get(name, ""))


def cxx_flags(platform: str = sys.platform) -> list[str]:
    """Host compiler flags, plus PNI_FAST_EXTRA_CXXFLAGS.

    No -march/-ffast-math: the library must run on any x86-64/ARM CPU (csrc/cpu picks SIMD
    at run time) and NaN/Inf in user tensors must propagate. -ffp-contract=off keeps every
    SIMD variant of the noise bit-identical. OpenMP: at::parallel_for is an inline OpenMP
    loop in torch's headers, without it the kernels run serially (Apple clang has none).
    """
    if platform == "win32":
        flags = ["/O2", "/fp:precise", "/openmp"]
    else:
        flags = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
        if platform != "darwin":
            flags.append("-fopenmp")
    return flags + extra_flags("PNI_FAST_EXTRA_CXXFLAGS")


def ld_flags(platform: str = sys.platform) -> list[str]:
    """Linker flags, plus PNI_FAST_EXTRA_LDFLAGS (MSVC links OpenMP from the /openmp compile flag)."""
    flags = [] if platform in ("darwin", "win32") else ["-fopenmp"]
    return flags + extra_flags("PNI_FAST_EXTRA_LDFLAGS")


def nvcc_flags() -> list[str]:
    """nvcc flags: accurate libm (no --use_fast_math), see design.md section 3."""
    return ["-O3"]


def define_macros(with_cuda: bool) -> list[tuple[str, str]]:
    return [("PNI_FAST_WITH_CUDA", "1")] if with_cuda else []


def cpu_sources(src_dir: str) -> list[str]:
    """ops.cpp (every schema) and the CPU kernels, in a fixed order."""
    return [os.path.join(src_dir, "ops.cpp")] + sorted(glob.glob(os.path.join(src_dir, "cpu", "*.cpp")))


def cuda_sources(src_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(src_dir, "cuda", "*.cu"))) + sorted(
        glob.glob(os.path.join(src_dir, "cuda", "*.cpp"))
    )


def include_dirs(src_dir: str) -> list[str]:
    return [src_dir]


def want_cuda(
    src_dir: str, cuda_available: bool, cuda_home: Optional[str], torch_cuda: Optional[str]
) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (FORCE_ONLY_CPU=1 / FORCE_CUDA=1 override the detection).

    cuda_available: torch.cuda.is_available(); cuda_home: torch.utils.cpp_extension.CUDA_HOME;
    torch_cuda: torch.version.cuda (None for a CPU-only torch).
    """
    if env_flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU=1"
    if not cuda_sources(src_dir):
        return False, "no CUDA sources under csrc/cuda"
    if torch_cuda is None:
        return False, "this torch has no CUDA support"
    if env_flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if not cuda_available:
        return False, "torch sees no GPU (FORCE_CUDA=1 builds the CUDA kernels anyway)"
    if cuda_home is None:
        return False, "nvcc not found (CUDA_HOME)"
    return True, "GPU and nvcc found"


def stamp(torch_version: str, with_cuda: bool) -> dict:
    """What the library was built against (written to STAMP_NAME beside it)."""
    return {"torch": torch_version, "cuda_kernels": bool(with_cuda), "python": "{}.{}".format(*sys.version_info[:2])}


def write_stamp(lib_dir: str, torch_version: str, with_cuda: bool) -> str:
    path = os.path.join(lib_dir, STAMP_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stamp(torch_version, with_cuda), f)
        f.write("\n")
    return path


def read_stamp(lib_dir: str) -> Optional[dict]:
    """The stamp beside a library, or None if there is none (or it is unreadable)."""
    try:
        with open(os.path.join(lib_dir, STAMP_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stamp_mismatch(lib_dir: str, torch_version: str) -> Optional[str]:
    """Why the library in `lib_dir` must not be loaded into `torch_version`, or None if it may be.

    A library without a stamp (an older build, or one made by hand) is allowed: nothing says
    it mismatches, and a failed import still falls back.
    """
    data = read_stamp(lib_dir)
    if data is None:
        return None
    built = data.get("torch")
    if built != torch_version:
        return (
            f"it was built against torch {built}, but torch {torch_version} is running "
            "(a C++ extension must be rebuilt for each torch version)"
        )
    return None
