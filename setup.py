"""Build script for pni_fast's compiled kernels (pni_fast._C).

Fast path (documented in the README, used by CI): torch is already installed, so build
against it without pip's build isolation::

    pip install --no-build-isolation .        # or -e . for development

With plain ``pip install .`` the isolated build environment usually has no torch; the
package then installs as pure Python and compiles the same csrc/ sources just in time
on first use (pni_fast/_ext.py), or runs on the pure-PyTorch backend.

Environment switches:
  FORCE_CUDA=1          build the CUDA kernels (csrc/cuda/*.cu) even without a visible GPU
  FORCE_ONLY_CPU=1      build the CPU kernels only
  PNI_FAST_SKIP_BUILD=1 build nothing (pure-Python install; JIT or pure PyTorch at run time)
  PNI_FAST_EXTRA_CXXFLAGS / PNI_FAST_EXTRA_LDFLAGS
                        extra host compiler / linker flags, appended (e.g. the sanitizer build of
                        scripts/sanitize.sh; never needed for a normal install)
By default the CUDA kernels are built when torch sees a GPU and nvcc (CUDA_HOME) exists.
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cxx_flags() -> list[str]:
    """Host compiler flags shared with the JIT build (pni_fast/_ext.py keeps a copy).

    No -march/-ffast-math: the wheel must run on any x86-64/ARM CPU (csrc/cpu picks SIMD
    at run time) and NaN/Inf in user tensors must propagate. -ffp-contract=off keeps
    every SIMD variant of the noise bit-identical.
    """
    if sys.platform == "win32":
        return ["/O2", "/fp:precise", "/openmp"]
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    return flags + openmp_flags()


def extra_flags(name: str) -> list[str]:
    """Flags from the environment variable `name` (PNI_FAST_EXTRA_CXXFLAGS / _LDFLAGS), shell-split."""
    return shlex.split(os.environ.get(name, ""))


def openmp_flags() -> list[str]:
    """at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp it runs serially."""
    if sys.platform == "darwin":  # Apple clang has no OpenMP by default: kernels run single-threaded
        return []
    return ["-fopenmp"]


def nvcc_flags() -> list[str]:
    # accurate libm (no --use_fast_math), see design.md section 3
    return ["-O3"]


def _ext_modules_and_cmdclass():
    cmdclass = {"build_py": BuildPyWithSources}
    if _flag("PNI_FAST_SKIP_BUILD"):
        print("pni_fast: PNI_FAST_SKIP_BUILD=1, installing without compiled kernels", file=sys.stderr)
        return [], cmdclass
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "pni_fast: torch is not importable in the build environment, installing without compiled "
            "kernels (they are built on first use). Use `pip install --no-build-isolation .` to build now.",
            file=sys.stderr,
        )
        return [], cmdclass

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    want_cuda = False
    if _flag("FORCE_ONLY_CPU"):
        want_cuda = False
    elif _flag("FORCE_CUDA"):
        want_cuda = True
    else:
        want_cuda = torch.cuda.is_available() and CUDA_HOME is not None
    if want_cuda and torch.version.cuda is None:
        print(f"pni_fast: torch {torch.__version__} has no CUDA support, building the CPU kernels only",
              file=sys.stderr)
        want_cuda = False
    if want_cuda and not cuda_sources:
        print("pni_fast: no CUDA sources under csrc/cuda, building the CPU kernels only", file=sys.stderr)
        want_cuda = False

    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda:
        ext = CUDAExtension(
            name="pni_fast._C",
            sources=sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags() + extra_flags("PNI_FAST_EXTRA_CXXFLAGS"), "nvcc": nvcc_flags()},
            extra_link_args=openmp_flags() + extra_flags("PNI_FAST_EXTRA_LDFLAGS"),
            define_macros=[("PNI_FAST_WITH_CUDA", "1")],
        )
    else:
        ext = CppExtension(
            name="pni_fast._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags() + extra_flags("PNI_FAST_EXTRA_CXXFLAGS")},
            extra_link_args=openmp_flags() + extra_flags("PNI_FAST_EXTRA_LDFLAGS"),
        )
    print(f"pni_fast: building pni_fast._C ({'CPU + CUDA' if want_cuda else 'CPU'}) against torch "
          f"{torch.__version__}", file=sys.stderr)
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)
    return [ext], cmdclass


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside the package (pni_fast/_csrc) so an installed copy can JIT-build it."""

    def run(self) -> None:
        super().run()
        src = os.path.join(ROOT, "csrc")
        if os.path.isdir(src):
            dst = os.path.join(self.build_lib, "pni_fast", "_csrc")
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
