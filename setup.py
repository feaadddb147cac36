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
  FORCE_CUDA=1              build the CUDA kernels (csrc/cuda/*.cu) even without a visible GPU, or
                            fail with the reason (CPU-only torch, no nvcc, compile error): never a
                            library without them
  TORCH_CUDA_ARCH_LIST      the GPU architectures to compile for ("8.0;9.0+PTX"); default: the
                            visible GPUs, else pni_fast/_build_config.py DEFAULT_CUDA_ARCHS
                            (8.0;8.6;8.9;9.0;10.0+PTX, less what nvcc cannot build); recorded in
                            the build stamp and shown by `python -m pni_fast info`
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
from typing import NoReturn, Optional

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


def _not_built(msg: str) -> None:
    """What was left out of the build and why: logged, and handed to the build backend, which prints
    it once where pip's normal output shows it (build_backend/pni_fast_build.py)."""
    _log(msg)
    os.environ[cfg.NOTICE_ENV] = msg


def _fail(msg: str) -> NoReturn:
    """Stop the build with one clear message (pip shows it under "error: subprocess-exited-with-error")."""
    raise SystemExit(f"\npni_fast: ERROR: {msg}\n")


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


def _build_ext_class(base, torch_version: str, with_cuda: bool, cuda: Optional[dict], not_built: Optional[str]):
    class BuildExtStamped(base):
        """torch's BuildExtension, plus the build stamp beside the library and an optional-build policy."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  (no compiler, compile error, ...)
                if cfg.env_flag("FORCE_CUDA"):  # asked for CUDA kernels: a failed build, never a library without
                    _log(f"compiling the kernels FAILED under FORCE_CUDA=1 ({type(exc).__name__}: {exc})")
                    raise
                # optional only for `pip install .` (the backend's build_wheel sets PNI_FAST_BUILD_OPTIONAL=1);
                # `pip install -e .` and a direct `setup.py build_ext` (scripts/sanitize.sh) fail loudly
                if cfg.env_flag("PNI_FAST_REQUIRE_BUILD") or not cfg.env_flag("PNI_FAST_BUILD_OPTIONAL"):
                    raise
                _not_built(
                    f"compiling the C++ kernels FAILED ({type(exc).__name__}: {_first_line(exc)}); installed "
                    "WITHOUT them: they compile just in time on first use, or the pure-PyTorch backend runs "
                    "(PNI_FAST_REQUIRE_BUILD=1 makes this an error; `pip install -v .` shows the compiler output)"
                )
                self._drop_outputs()
                return
            for ext in self.extensions:
                for lib_dir in self._lib_dirs(ext):
                    cfg.write_stamp(lib_dir, torch_version, with_cuda, cuda, not_built)

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


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:300]


def _cuda_arch_plan(torch, cuda_home: Optional[str]) -> dict:
    """The architectures to compile for (TORCH_CUDA_ARCH_LIST, the visible GPUs or the default list)."""
    nvcc = cfg.nvcc_path(cuda_home)
    caps = []
    if torch.cuda.is_available():
        caps = [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    try:
        torch_archs = list(torch.cuda.get_arch_list())
    except Exception:  # noqa: BLE001  (older torch without a GPU)
        torch_archs = []
    plan = cfg.cuda_arch_plan(os.environ.get("TORCH_CUDA_ARCH_LIST"), caps, cfg.nvcc_gpu_codes(nvcc), torch_archs)
    plan["nvcc"] = cfg.nvcc_version(nvcc)
    return plan


def _ext_modules_and_cmdclass():
    cmdclass = {"build_py": BuildPyWithSources}
    force_cuda = cfg.env_flag("FORCE_CUDA")
    if cfg.env_flag("PNI_FAST_SKIP_BUILD"):
        if force_cuda:
            _fail("FORCE_CUDA=1 and PNI_FAST_SKIP_BUILD=1 are both set: unset one of them")
        _not_built("PNI_FAST_SKIP_BUILD=1: installed WITHOUT compiled kernels (they compile just in time on first use)")
        return [], cmdclass
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if force_cuda:
            _fail(
                "FORCE_CUDA=1, but no torch was found in the target environment, so nothing can be compiled. "
                "Install a CUDA build of torch first, then pni_fast (or build with --no-build-isolation)."
            )
        _not_built(
            "no torch in the target environment: installed WITHOUT compiled kernels (they compile just in time "
            "on first use). Install torch first, then pni_fast, to build them now."
        )
        return [], cmdclass

    support = cfg.torch_support_note(torch.__version__)
    if support.startswith("WARNING"):
        _log(f"{support}: the build may fail or the library misbehave; upgrade torch")
    src = "csrc"  # relative paths: setuptools wants sources relative to setup.py
    try:
        with_cuda, why = cfg.want_cuda(src, torch.cuda.is_available(), CUDA_HOME, torch.version.cuda)
        plan = _cuda_arch_plan(torch, CUDA_HOME) if with_cuda else None
    except cfg.BuildError as exc:
        _fail(str(exc))
    not_built = None
    if not with_cuda and torch.version.cuda is not None and not cfg.env_flag("FORCE_ONLY_CPU"):
        not_built = f"CUDA kernels not built: {why}"
        _not_built(f"built the CPU kernels only; {not_built}")
    kwargs = dict(
        name="pni_fast._C",
        include_dirs=[os.path.join(ROOT, d) for d in cfg.include_dirs(src)],
        extra_link_args=cfg.ld_flags(),
        define_macros=cfg.define_macros(with_cuda),
    )
    if with_cuda:
        n_cu = len([f for f in cfg.cuda_sources(src) if f.endswith(".cu")])
        nvcc = cfg.nvcc_flags() + cfg.gencode_flags(plan)
        nvcc += cfg.nvcc_thread_flags(len(cfg.gencode_flags(plan)), n_cu, os.cpu_count())
        ext = CUDAExtension(
            sources=cfg.cpu_sources(src) + cfg.cuda_sources(src),
            extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=cfg.cpu_sources(src), extra_compile_args={"cxx": cfg.cxx_flags()}, **kwargs)
    archs = ""
    if with_cuda:
        archs = f"; GPU architectures {plan['arch_list']} from {plan['source']}, nvcc {plan['nvcc']}"
        if plan["dropped"]:
            archs += f"; left out: {', '.join(plan['dropped'])}"
    _log(
        f"building pni_fast._C ({'CPU + CUDA' if with_cuda else 'CPU'}: {why}{archs}) against torch "
        f"{torch.__version__} from {os.path.dirname(torch.__file__)}"
    )
    base = BuildExtension.with_options(no_python_abi_suffix=False)
    cmdclass["build_ext"] = _build_ext_class(base, torch.__version__, with_cuda, plan, not_built)
    return [ext], cmdclass


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
