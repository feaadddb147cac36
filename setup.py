"""Build script for pni_fast's compiled kernels (pni_fast._C).

``pip install .`` builds them against the torch already installed in the target environment:
the in-tree build backend (build_backend/pni_fast_build.py, see pyproject.toml) makes that torch
importable inside pip's isolated build environment, so no second torch is downloaded and the
library matches the torch it runs with. ``pip install --no-build-isolation .`` does the same
without the isolated environment. Sources and flags: pni_fast/_build_config.py (shared with the
just-in-time build of pni_fast/_ext.py). Measurements and the details: docs/install.md.

Without torch in the target environment the package installs as pure Python; the kernels are
then compiled just in time on first use (pni_fast/_ext.py), or the pure-PyTorch backend runs.

Environment switches:
  FORCE_CUDA=1              build the CUDA kernels (csrc/cuda/*.cu) even without a visible GPU
  FORCE_ONLY_CPU=1          build the CPU kernels only
  PNI_FAST_SKIP_BUILD=1     build nothing (pure-Python install; JIT or pure PyTorch at run time)
  PNI_FAST_REQUIRE_BUILD=1  a failed compile fails `pip install .` too (default there: warn and
                            install without the kernels, which then compile just in time or fall
                            back to PyTorch; `pip install -e .` and `setup.py build_ext` always fail)
  PNI_FAST_EXTRA_CXXFLAGS / PNI_FAST_EXTRA_LDFLAGS
                            extra host compiler / linker flags, appended (e.g. the sanitizer build of
                            scripts/sanitize.sh; never needed for a normal install)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """pni_fast/_build_config.py by path: importing the package would import torch."""
    path = os.path.join(ROOT, "pni_fast", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_pni_fast_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cfg = _load_build_config()


def _log(msg: str) -> None:
    print(f"pni_fast: {msg}", file=sys.stderr)


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


def _build_ext_class(base, torch_version: str, with_cuda: bool):
    class BuildExtStamped(base):
        """torch's BuildExtension, plus the build stamp beside the library and an optional-build policy."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  (no compiler, compile error, ...)
                # optional only for `pip install .` (the backend's build_wheel sets PNI_FAST_BUILD_OPTIONAL=1);
                # `pip install -e .` and a direct `setup.py build_ext` (scripts/sanitize.sh) fail loudly
                if cfg.env_flag("PNI_FAST_REQUIRE_BUILD") or not cfg.env_flag("PNI_FAST_BUILD_OPTIONAL"):
                    raise
                _log(
                    f"compiling the C++ kernels FAILED ({type(exc).__name__}: {exc}); installing without "
                    "them: they compile just in time on first use, or the pure-PyTorch backend runs. "
                    "Set PNI_FAST_REQUIRE_BUILD=1 to make this an error."
                )
                self._drop_outputs()
                return
            for ext in self.extensions:
                for lib_dir in self._lib_dirs(ext):
                    cfg.write_stamp(lib_dir, torch_version, with_cuda)

        def _lib_dirs(self, ext) -> set:
            """Folders holding the built library: the build tree, and the source tree when in place."""
            paths = {self.get_ext_fullpath(ext.name)}
            if self.inplace:
                self.inplace = False
                paths.add(self.get_ext_fullpath(ext.name))
                self.inplace = True
            return {os.path.dirname(p) for p in paths if os.path.isfile(p)}

        def _drop_outputs(self) -> None:
            self.extensions = []
            self.distribution.ext_modules = []

    return BuildExtStamped


def _ext_modules_and_cmdclass():
    cmdclass = {"build_py": BuildPyWithSources}
    if cfg.env_flag("PNI_FAST_SKIP_BUILD"):
        _log("PNI_FAST_SKIP_BUILD=1, installing without compiled kernels")
        return [], cmdclass
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log(
            "torch is not installed in the target environment, installing without compiled kernels (they "
            "are built on first use). Install torch first, then pni_fast, to build them now."
        )
        return [], cmdclass

    src = "csrc"  # relative paths: setuptools wants sources relative to setup.py
    with_cuda, why = cfg.want_cuda(src, torch.cuda.is_available(), CUDA_HOME, torch.version.cuda)
    kwargs = dict(
        name="pni_fast._C",
        include_dirs=[os.path.join(ROOT, d) for d in cfg.include_dirs(src)],
        extra_link_args=cfg.ld_flags(),
        define_macros=cfg.define_macros(with_cuda),
    )
    if with_cuda:
        ext = CUDAExtension(
            sources=cfg.cpu_sources(src) + cfg.cuda_sources(src),
            extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": cfg.nvcc_flags()},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=cfg.cpu_sources(src), extra_compile_args={"cxx": cfg.cxx_flags()}, **kwargs)
    _log(
        f"building pni_fast._C ({'CPU + CUDA' if with_cuda else 'CPU'}: {why}) against torch "
        f"{torch.__version__} from {os.path.dirname(torch.__file__)}"
    )
    base = BuildExtension.with_options(no_python_abi_suffix=False)
    cmdclass["build_ext"] = _build_ext_class(base, torch.__version__, with_cuda)
    return [ext], cmdclass


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
