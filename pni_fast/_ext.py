"""Loader of the compiled kernels (``torch.ops.pni_fast.*`` C++ ops).

Two paths, like DeepSpeed's op builder (design.md section 11):

1. ahead of time: ``pni_fast._C``, built by ``pip install .`` against the installed torch. Its
   stamp (``_C_build.json``, written by setup.py) names that torch; a library built against
   another torch is not loaded at all (a C++ extension's ABI changes between torch versions:
   loading it could crash), and the message says so;
2. just in time: if ``_C`` is missing, refused or fails to load, compile the same ``csrc/``
   sources with ``torch.utils.cpp_extension.load`` into torch's extension cache, under a name
   keyed by the torch version, printing one message while it builds. ``PNI_FAST_NO_JIT=1``
   disables this step.

Both builds take their sources and flags from ``pni_fast/_build_config.py``.

Nothing here raises: if both paths fail, one warning says that the pure-PyTorch backend
runs instead, and :func:`status_message` says why.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import threading
import warnings
from typing import Optional

from . import _build_config

__all__ = [
    "load",
    "is_loaded",
    "available",
    "has_cuda",
    "has_op",
    "status_message",
    "source_dir",
    "build_archs",
    "gpu_arch_warnings",
]

_lock = threading.Lock()
_state: dict = {"loaded": None, "msg": "not loaded yet", "warned": False, "lib_dir": None, "jit_cuda": None}
_op_cache: dict = {}


def _flag(name: str) -> bool:
    return _build_config.env_flag(name)


def source_dir() -> Optional[str]:
    """Directory holding ops.cpp: the installed copy (pni_fast/_csrc) or the checkout's csrc/."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(cand, "ops.cpp")):
            return cand
    return None


def _ops_registered() -> bool:
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("pni_fast::perturb", "CPU")
    except Exception:  # noqa: BLE001  (schema not defined yet)
        return False


# every op csrc/ops.cpp defines with a CPU kernel; a library missing some is a stale build
EXPECTED_OPS = (
    "noise",
    "rng_words",
    "rng_uniform",
    "perturb",
    "perturb_alpha_grad",
    "perturb_multi",
    "perturb_alpha_grad_multi",
    "sigma",
    "sigma_multi",
)


def _missing_ops() -> list[str]:
    import torch

    missing = []
    for name in EXPECTED_OPS:
        try:
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"pni_fast::{name}", "CPU")
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            missing.append(name)
    return missing


def _installed_library() -> Optional[str]:
    """Path of the _C library of the installed distribution, if it is not this directory's.

    Running from a checkout (tests from the repository root) imports the source tree's
    pni_fast, which has no _C after a non-editable ``pip install .``; the installed copy's
    library is the same build and can be loaded directly.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from importlib import metadata

        dists = [d for d in metadata.distributions() if (d.metadata["Name"] or "").lower() == "pni_fast"]
        for dist in dists:  # a checkout may also hold an egg-info without files
            for f in dist.files or []:
                name = os.path.basename(str(f))
                if str(f).startswith("pni_fast") and name.startswith("_C.") and name.endswith((".so", ".pyd")):
                    path = os.path.abspath(str(f.locate()))
                    if os.path.isfile(path) and os.path.dirname(path) != here:
                        return path
    except Exception:  # noqa: BLE001  (broken metadata: no fallback)
        return None
    return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _stamp_refusal(lib_dir: str, what: str) -> Optional[str]:
    """Why the library `what` in `lib_dir` must not be loaded into the running torch (see _build_config)."""
    import torch

    if not any(n.startswith("_C.") and n.endswith((".so", ".pyd")) for n in _listdir(lib_dir)):
        return None  # no library here (a stamp left by an earlier build says nothing)
    why = _build_config.stamp_mismatch(lib_dir, torch.__version__)
    if why is None:
        return None
    return (
        f"{what} not loaded: {why}; reinstall pni_fast for this torch "
        "(`pip install --force-reinstall --no-deps .` from the source)"
    )


def _load_aot() -> tuple[bool, str]:
    here = os.path.dirname(os.path.abspath(__file__))
    refusal = _stamp_refusal(here, "pni_fast._C")
    if refusal is not None:
        return False, refusal
    try:
        importlib.import_module(f"{__package__}._C")  # importing registers the ops
    except Exception as exc:  # noqa: BLE001  (missing, ABI mismatch, ...)
        reason = f"pni_fast._C could not be imported ({type(exc).__name__}: {exc})"
        path = _installed_library()
        if path is None:
            return False, reason
        refusal = _stamp_refusal(os.path.dirname(path), f"installed {path}")
        if refusal is not None:
            return False, f"{reason}; {refusal}"
        try:
            import torch

            torch.ops.load_library(path)
        except Exception as exc2:  # noqa: BLE001
            return False, f"{reason}; installed {path} failed to load ({type(exc2).__name__}: {exc2})"
        if not _ops_registered():
            return False, f"{reason}; installed {path} registered no CPU kernels"
        _state["lib_dir"] = os.path.dirname(path)
        return True, f"installed ahead-of-time build {path}"
    if not _ops_registered():
        return False, "pni_fast._C imported but registered no CPU kernels"
    _state["lib_dir"] = here
    return True, "pni_fast._C (ahead-of-time build)"


def _jit_name(with_cuda: bool) -> str:
    import torch

    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"pni_fast_C_torch{tag}" + ("_cuda" if with_cuda else "_cpu")


def _cuda_arch_plan(cuda_home: Optional[str]) -> dict:
    """The GPU architectures of a CUDA build (the same rule as setup.py: pni_fast/_build_config.py)."""
    import torch

    nvcc = _build_config.nvcc_path(cuda_home)
    caps = []
    if torch.cuda.is_available():
        caps = [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    try:
        torch_archs = list(torch.cuda.get_arch_list())
    except Exception:  # noqa: BLE001
        torch_archs = []
    plan = _build_config.cuda_arch_plan(
        os.environ.get("TORCH_CUDA_ARCH_LIST"), caps, _build_config.nvcc_gpu_codes(nvcc), torch_archs
    )
    plan["nvcc"] = _build_config.nvcc_version(nvcc)
    return plan


def _load_jit() -> tuple[bool, str]:
    if _flag("PNI_FAST_NO_JIT"):
        return False, "JIT build disabled by PNI_FAST_NO_JIT=1"
    src = source_dir()
    if src is None:
        return False, "C++ sources (csrc/) not found next to the package, cannot JIT-build"
    try:
        import torch
        from torch.utils import cpp_extension

        with_cuda = _build_config.want_cuda(
            src, torch.cuda.is_available(), cpp_extension.CUDA_HOME, torch.version.cuda
        )[0]
        sources = _build_config.cpu_sources(src)
        cuda_flags = _build_config.nvcc_flags()
        if with_cuda:
            sources += _build_config.cuda_sources(src)
            plan = _cuda_arch_plan(cpp_extension.CUDA_HOME)
            cuda_flags = cuda_flags + _build_config.gencode_flags(plan)
            _state["jit_cuda"] = plan
        name = _jit_name(with_cuda)
        print(
            f"pni_fast: compiling the C++ kernels ({'CPU + CUDA' if with_cuda else 'CPU'}) for torch "
            f"{torch.__version__} into torch's extension cache as {name} (first use only, about a minute)...",
            file=sys.stderr,
            flush=True,
        )
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=_build_config.cxx_flags() + [f"-D{k}={v}" for k, v in _build_config.define_macros(with_cuda)],
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=_build_config.ld_flags(),
            extra_include_paths=_build_config.include_dirs(src),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=_flag("PNI_FAST_VERBOSE_BUILD"),
        )
    except Exception as exc:  # noqa: BLE001  (no compiler, build error, ...)
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]  # the compiler's first error says most
        detail = errors[0] if errors else (lines[-1] if lines else "")
        return False, f"JIT build failed ({type(exc).__name__}: {detail[:300]})"
    if not _ops_registered():
        return False, "JIT build loaded but registered no CPU kernels"
    return True, f"JIT build {name} of {src}"


def load() -> bool:
    """Load the C++ ops once (AOT, then JIT); True if ``torch.ops.pni_fast.perturb`` has a CPU kernel."""
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        if _ops_registered():  # loaded by someone else, e.g. torch.ops.load_library
            _state.update(loaded=True, msg="C++ ops already registered")
            return True
        ok, msg = _load_aot()
        if not ok:
            aot_msg = msg
            ok, msg = _load_jit()
            if not ok:
                msg = f"{aot_msg}; {msg}"
        if ok:
            missing = _missing_ops()
            if missing:
                msg += (
                    f"; stale build without {', '.join(missing)}: rebuild with `pip install --no-build-isolation -e .`"
                )
                warnings.warn(f"pni_fast: {msg}", RuntimeWarning, stacklevel=2)
        _state.update(loaded=ok, msg=msg)
        if not ok and not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                f"pni_fast: C++ kernels unavailable, using the pure-PyTorch backend (same noise, slower). "
                f"Reason: {msg}",
                RuntimeWarning,
                stacklevel=2,
            )
        return ok


def is_loaded() -> bool:
    """True if :func:`load` already ran and succeeded (never triggers a load or a JIT build)."""
    return bool(_state["loaded"])


def available() -> bool:
    """True if the C++ ops (CPU kernels) are loaded; triggers :func:`load`."""
    return load()


def has_cuda() -> bool:
    """True if the loaded C++ ops include CUDA kernels."""
    if not load():
        return False
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("pni_fast::perturb", "CUDA")
    except Exception:  # noqa: BLE001
        return False


def has_op(name: str, device: str = "cpu") -> bool:
    """True if the loaded library has a kernel of ``torch.ops.pni_fast.<name>`` for ``device``.

    For optional ops (``sigma`` has CPU kernels only) and builds older than the sources.
    """
    if not load():
        return False
    cached = _op_cache.get((name, device))
    if cached is not None:  # the dispatcher lookup costs ~2 us: once per op is enough
        return cached
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device, device)
    try:
        found = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"pni_fast::{name}", key))
    except Exception:  # noqa: BLE001  (no such op)
        found = False
    _op_cache[(name, device)] = found
    return found


def build_archs() -> Optional[dict]:
    """The GPU architectures of the loaded CUDA kernels ({"arch_list", "sass", "ptx", "source", ...}).

    From the build stamp of the ahead-of-time library, or the plan of this process's JIT build;
    None without CUDA kernels or for a library without that record (an older build).
    """
    if not has_cuda():
        return None
    if _state["jit_cuda"] is not None:
        return _state["jit_cuda"]
    data = _build_config.read_stamp(_state["lib_dir"]) if _state["lib_dir"] else None
    cuda = (data or {}).get("cuda")
    return cuda if isinstance(cuda, dict) else None


def _not_built_note() -> str:
    data = _build_config.read_stamp(_state["lib_dir"]) if _state["lib_dir"] else None
    note = (data or {}).get("not_built")
    return f" ({note})" if note else ""


def gpu_arch_warnings() -> list[str]:
    """One line per visible GPU that has no machine code in the loaded CUDA kernels.

    PTX of a lower architecture still runs there (the driver compiles it at first use, a slower
    first call); without that the CUDA ops cannot run on it. Initializes CUDA: called by
    status_message (``python -m pni_fast info``), never at import.
    """
    archs = build_archs()
    if archs is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        kind, text = _build_config.runs_on(archs, tuple(torch.cuda.get_device_capability(i)))
        if kind != "sass":
            out.append(f"WARNING: cuda:{i} ({torch.cuda.get_device_name(i)}): {text}")
    return out


def status_message() -> str:
    """One line saying where the C++ ops came from, or why they are unavailable.

    With CUDA kernels it names their GPU architectures and warns about a visible GPU without
    machine code among them (see :func:`gpu_arch_warnings`).
    """
    load()
    extra = ""
    if _state["loaded"]:
        if has_cuda():
            archs = build_archs()
            if archs is None:
                extra += " with CUDA kernels (architectures not recorded: an older build)"
            else:
                ptx = f" + PTX {', '.join(archs.get('ptx', []))}" if archs.get("ptx") else ""
                extra += f" with CUDA kernels for {', '.join(archs.get('sass', []))}{ptx} ({archs.get('source', '?')})"
            for line in gpu_arch_warnings():
                extra += f"; {line}"
        else:
            extra += _not_built_note()
        try:
            import torch

            extra += f"; CPU SIMD: {torch.ops.pni_fast.cpu_isa()}"
        except Exception:  # noqa: BLE001  (older build without cpu_isa)
            pass
    return f"{_state['msg']}{extra}"
