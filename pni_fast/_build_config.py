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
import re
import shlex
import subprocess
import sys
from typing import Optional

# Written next to the built library: the torch it was compiled against. _ext.py refuses to
# load a library whose stamp names another torch (the C++ ABI is not stable across versions).
STAMP_NAME = "_C_build.json"

# setup.py puts what it left out of a build (and why) here; the build backend prints it once, where
# pip's normal output shows it (build_backend/pni_fast_build.py)
NOTICE_ENV = "PNI_FAST_BUILD_NOTICE"


# The torch (and Triton) versions pni_fast supports. The GPU image it targets first has torch 2.11
# (+cu130) with Triton 3.6; development and CI use torch 2.13 / 2.14 with Triton 3.7 / 3.8.
# pyproject.toml declares torch>=TORCH_MIN and, for the `triton` extra, triton>=TRITON_MIN
# (tests/tooling/test_build_cuda_flags.py checks they agree). No upper bound there: the kernels are
# compiled against whatever torch is installed, and a bound would make pip replace a newer torch.
TORCH_MIN = (2, 11)
TORCH_TESTED = ("2.13", "2.14")  # 2.11: first run on the GPU image (scripts/gpu_check.sh, env.txt)
TRITON_MIN = (3, 6)
TRITON_TESTED = ("3.7", "3.8")


def _major_minor(version: Optional[str]) -> Optional[tuple[int, int]]:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def torch_support_note(torch_version: str, triton_version: Optional[str] = None) -> str:
    """One line: is this torch (and Triton) in the supported range, and was that version tested."""
    parts = []
    for name, version, low, tested in (
        ("torch", torch_version, TORCH_MIN, TORCH_TESTED),
        ("triton", triton_version, TRITON_MIN, TRITON_TESTED),
    ):
        mm = _major_minor(version)
        if mm is None:
            if name == "torch":
                parts.append(f"torch {version}: version not understood")
            continue
        text = f"{mm[0]}.{mm[1]}"
        if mm < low:
            parts.append(f"WARNING: {name} {version} is older than the supported {low[0]}.{low[1]}")
        elif text in tested:
            parts.append(f"{name} {version} supported (tested: {', '.join(tested)})")
        else:
            parts.append(f"{name} {version} supported but untested (tested: {', '.join(tested)})")
    return "; ".join(parts)


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


class BuildError(RuntimeError):
    """A build the user asked for cannot be done; the message says why and what to set."""


def want_cuda(
    src_dir: str, cuda_available: bool, cuda_home: Optional[str], torch_cuda: Optional[str]
) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (FORCE_ONLY_CPU=1 / FORCE_CUDA=1 override the detection).

    cuda_available: torch.cuda.is_available(); cuda_home: torch.utils.cpp_extension.CUDA_HOME;
    torch_cuda: torch.version.cuda (None for a CPU-only torch).

    FORCE_CUDA=1 means CUDA kernels or an error: every case that cannot build them raises
    BuildError with the reason and what to change, never a quiet CPU-only build.
    """
    force = env_flag("FORCE_CUDA")
    if force and env_flag("FORCE_ONLY_CPU"):
        raise BuildError("FORCE_CUDA=1 and FORCE_ONLY_CPU=1 are both set: unset one of them")
    if env_flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU=1"
    if not cuda_sources(src_dir):
        if force:
            raise BuildError(f"FORCE_CUDA=1, but there are no CUDA sources under {os.path.join(src_dir, 'cuda')}")
        return False, "no CUDA sources under csrc/cuda"
    if torch_cuda is None:
        if force:
            raise BuildError(
                "FORCE_CUDA=1, but the installed torch is a CPU-only build (torch.version.cuda is None), so no "
                "CUDA kernels can be compiled against it. Install a CUDA build of torch first (e.g. `pip install "
                "torch --index-url https://download.pytorch.org/whl/cu130`), or unset FORCE_CUDA for a CPU build."
            )
        return False, "this torch has no CUDA support (a CPU-only build)"
    if cuda_home is None:
        if force:
            raise BuildError(
                "FORCE_CUDA=1, but nvcc was not found: set CUDA_HOME to the CUDA toolkit "
                f"(the folder holding bin/nvcc, matching torch's CUDA {torch_cuda}) or put nvcc on PATH."
            )
        return False, "nvcc not found (set CUDA_HOME)"
    problem = cuda_toolkit_problem(cuda_home)
    if problem is not None:
        if force:
            raise BuildError(f"FORCE_CUDA=1, but {problem}")
        return False, problem
    if force:
        return True, "FORCE_CUDA=1"
    if not cuda_available:
        return False, "torch sees no GPU (FORCE_CUDA=1 builds them anyway, for the default architectures)"
    return True, "GPU and nvcc found"


def _cudart_dir(cuda_home: str) -> Optional[str]:
    """The folder torch's CUDAExtension links libcudart from (lib64, else lib), if libcudart.so is there."""
    lib = os.path.join(cuda_home, "lib64")
    if not os.path.isdir(lib) and os.path.isdir(os.path.join(cuda_home, "lib")):
        lib = os.path.join(cuda_home, "lib")
    return lib if os.path.exists(os.path.join(lib, "libcudart.so")) else None


def cuda_toolkit_problem(
    cuda_home: str, platform: str = sys.platform, candidates: tuple[str, ...] = ("/usr/local/cuda", "/opt/cuda")
) -> Optional[str]:
    """Why the toolkit at `cuda_home` cannot link the CUDA kernels, or None (checked on Linux only).

    torch takes CUDA_HOME from the folder above the first nvcc on PATH; a wrapper script such as
    /usr/local/bin/nvcc then gives CUDA_HOME=/usr/local, where the compile works (minutes per
    architecture) and only the final link fails, on -lcudart. Checked before anything is compiled.
    """
    if not platform.startswith("linux") or _cudart_dir(cuda_home) is not None:
        return None
    good = next(
        (c for c in candidates if c != cuda_home and os.path.isfile(os.path.join(c, "bin", "nvcc")) and _cudart_dir(c)),
        None,
    )
    fix = f"set CUDA_HOME={good}" if good else "set CUDA_HOME to the CUDA toolkit's root folder"
    return (
        f"CUDA_HOME={cuda_home} has nvcc but no lib64/libcudart.so or lib/libcudart.so, which linking the CUDA "
        f"kernels needs: {fix}"
    )


# --- CUDA architectures ---------------------------------------------------------------------------
# Built when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (e.g. FORCE_CUDA=1 on a build
# machine): A100 (8.0), RTX 30xx/A10/A40 (8.6), L4/L40/RTX 40xx (8.9), H100/H200 (9.0), B200/GB200
# (10.0), each as machine code (SASS), plus the PTX of the highest one, which the driver compiles
# at first use for newer GPUs (B300 10.3, RTX 50xx 12.0, ...). Entries the installed nvcc cannot
# build are dropped (and recorded). Older GPUs (T4: 7.5, V100: 7.0) need TORCH_CUDA_ARCH_LIST.
DEFAULT_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0")

# the family names TORCH_CUDA_ARCH_LIST also accepts (the numbers torch's documentation gives them)
_NAMED_ARCHS = {
    "Volta": "7.0+PTX",
    "Turing": "7.5+PTX",
    "Ampere": "8.0;8.6+PTX",
    "Ada": "8.9+PTX",
    "Hopper": "9.0+PTX",
    "Blackwell": "10.0;10.3;12.0;12.1+PTX",
}
_ARCH_RE = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")


def parse_arch_list(text: str) -> list[tuple[str, bool]]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "8.6 9.0", "Hopper") -> [(code, ptx)], e.g. [("80", False), ("90", True)].

    code: major and minor digits plus an optional arch-specific suffix ("90a"); raises BuildError
    on anything else.
    """
    for name, value in _NAMED_ARCHS.items():
        text = re.sub(rf"\b{name}\b", value, text)
    out: list[tuple[str, bool]] = []
    for item in re.split(r"[;\s,]+", text.strip()):
        if not item:
            continue
        m = _ARCH_RE.match(item)
        if m is None:
            raise BuildError(
                f"TORCH_CUDA_ARCH_LIST: cannot read {item!r}; write compute capabilities like "
                "'8.0;8.6;9.0+PTX' (the GPU's is in `nvidia-smi --query-gpu=compute_cap --format=csv`)"
            )
        code = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        entry = (code, bool(m.group(4)))
        if entry not in out:
            out.append(entry)
    if not out:
        raise BuildError("TORCH_CUDA_ARCH_LIST is set but names no architecture")
    return out


def _code_number(code: str) -> int:
    return int(re.match(r"\d+", code).group(0))


def _code_text(code: str) -> str:
    """The compute capability of an arch code: 90 -> 9.0, 100a -> 10.0a."""
    m = re.match(r"(\d+)(\d)([af]?)$", code)
    return f"{m.group(1)}.{m.group(2)}{m.group(3)}"


def nvcc_path(cuda_home: Optional[str]) -> Optional[str]:
    if not cuda_home:
        return None
    path = os.path.join(cuda_home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")
    return path if os.path.isfile(path) else None


def nvcc_gpu_codes(nvcc: Optional[str]) -> Optional[set[str]]:
    """The sm_ codes `nvcc --list-gpu-code` can build ({"75", "80", ..., "90a"}); None if unknown."""
    if nvcc is None:
        return None
    try:
        res = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    codes = set(re.findall(r"\bsm_(\d+[af]?)\b", res.stdout))
    return codes if res.returncode == 0 and codes else None


def nvcc_version(nvcc: Optional[str]) -> Optional[str]:
    """The release of `nvcc --version` (e.g. 13.0), None if unknown."""
    if nvcc is None:
        return None
    try:
        res = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", res.stdout)
    return m.group(1) if m else None


def cuda_arch_plan(
    env_list: Optional[str],
    visible_caps: list[tuple[int, int]],
    nvcc_codes: Optional[set[str]],
    torch_archs: Optional[list[str]] = None,
) -> dict:
    """Which architectures the CUDA kernels are compiled for, and why.

    env_list: TORCH_CUDA_ARCH_LIST (None/empty: not set; "native": the visible GPUs);
    visible_caps: the compute capabilities torch sees ([(9, 0)]); nvcc_codes: nvcc_gpu_codes();
    torch_archs: torch.cuda.get_arch_list() (["sm_80", ..., "compute_90"]; empty: unknown).
    Order: TORCH_CUDA_ARCH_LIST, else the visible GPUs, else DEFAULT_CUDA_ARCHS; the default list
    is filtered by what nvcc builds and by what torch itself runs on.
    Returns {"arch_list": "8.0;9.0+PTX", "sass": ["sm_80", "sm_90"], "ptx": ["compute_90"],
    "source": ..., "dropped": [...]}; raises BuildError if nothing is left or an explicitly
    requested architecture cannot be built.
    """
    env_list = (env_list or "").strip()
    dropped: list[str] = []
    if env_list and env_list != "native":
        entries = parse_arch_list(env_list)
        if nvcc_codes is not None:
            bad = [_code_text(c) for c, _ in entries if c not in nvcc_codes]
            if bad:
                raise BuildError(
                    f"TORCH_CUDA_ARCH_LIST={env_list} asks for {', '.join(bad)}, which this nvcc cannot build "
                    f"(it builds {', '.join(_code_text(c) for c in sorted(nvcc_codes, key=_code_number))}): "
                    "remove them or use a CUDA toolkit that supports them"
                )
        source = f"TORCH_CUDA_ARCH_LIST={env_list}"
    elif visible_caps:
        codes: list[str] = []
        for major, minor in visible_caps:
            code = f"{major}{minor}"
            if nvcc_codes is not None and code not in nvcc_codes:
                lower = [c for c in nvcc_codes if c.isdigit() and int(c) <= int(code)]
                if not lower:
                    raise BuildError(
                        f"the visible GPU is {major}.{minor}, which this nvcc cannot build for: use a newer "
                        "CUDA toolkit (CUDA_HOME) or set TORCH_CUDA_ARCH_LIST"
                    )
                dropped.append(f"{major}.{minor} (not built by this nvcc; its PTX of a lower one is used)")
                code = max(lower, key=int)
            if code not in codes:
                codes.append(code)
        codes.sort(key=_code_number)
        entries = [(c, i == len(codes) - 1) for i, c in enumerate(codes)]
        source = "the visible GPU" + ("s" if len(visible_caps) > 1 else "")
        if env_list == "native":
            source += " (TORCH_CUDA_ARCH_LIST=native)"
    else:
        codes = []
        for arch in DEFAULT_CUDA_ARCHS:
            code = arch.replace(".", "")
            if nvcc_codes is not None and code not in nvcc_codes:
                dropped.append(f"{arch} (not built by this nvcc)")
            elif torch_archs and _torch_runs_on(torch_archs, _code_number(code)) is False:
                dropped.append(f"{arch} (this torch has no kernels for it)")
            else:
                codes.append(code)
        if not codes:
            raise BuildError(
                f"no GPU is visible and this nvcc builds none of the default architectures "
                f"{';'.join(DEFAULT_CUDA_ARCHS)}: set TORCH_CUDA_ARCH_LIST (e.g. TORCH_CUDA_ARCH_LIST=9.0)"
            )
        entries = [(c, i == len(codes) - 1) for i, c in enumerate(codes)]
        source = "the default list (no GPU visible, TORCH_CUDA_ARCH_LIST not set)"
    return {
        "arch_list": ";".join(_code_text(c) + ("+PTX" if ptx else "") for c, ptx in entries),
        "sass": [f"sm_{c}" for c, _ in entries],
        "ptx": [f"compute_{c}" for c, ptx in entries if ptx],
        "source": source,
        "dropped": dropped,
    }


def _torch_runs_on(torch_archs: list[str], code: int) -> bool:
    """Whether a torch built for `torch_archs` (sm_80, compute_90, ...) runs on a GPU of arch `code`."""
    plan = {
        "sass": [a for a in torch_archs if a.startswith("sm_")],
        "ptx": [a for a in torch_archs if a.startswith("compute_")],
    }
    return runs_on(plan, (code // 10, code % 10))[0] != "none"


def gencode_flags(plan: dict) -> list[str]:
    """nvcc -gencode flags of an arch plan: machine code for each entry, PTX for the +PTX ones.

    Passing them explicitly also keeps torch's own arch detection out of the build (without a
    visible GPU and TORCH_CUDA_ARCH_LIST it raises IndexError in torch <= 2.14).
    """
    flags = []
    for sm in plan["sass"]:
        code = sm[len("sm_") :]
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
    for ptx in plan["ptx"]:
        code = ptx[len("compute_") :]
        flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    return flags


def nvcc_thread_flags(n_targets: int, n_files: int, cpus: Optional[int]) -> list[str]:
    """nvcc --threads: compile the architectures of one file in parallel, sharing the CPUs among the files."""
    threads = max(1, min(n_targets, (cpus or 1) // max(1, n_files)))
    return [f"--threads={threads}"] if threads > 1 else []


def runs_on(plan_or_stamp: dict, capability: tuple[int, int]) -> tuple[str, str]:
    """How a library with these architectures runs on a GPU of `capability`: (kind, text).

    kind: "sass" (machine code for it, or for a lower minor of the same major: binary compatible),
    "ptx" (no machine code: the driver JIT-compiles PTX of a lower architecture at first use) or
    "none" (no kernel image: the CUDA ops fail there).
    """
    major, minor = capability
    target = major * 10 + minor
    sass = [s[len("sm_") :] for s in plan_or_stamp.get("sass", [])]
    ptx = [p[len("compute_") :] for p in plan_or_stamp.get("ptx", [])]
    exact = [c for c in sass if re.fullmatch(rf"{target}[af]?", c)]
    if exact:
        return "sass", f"sm_{major}{minor} machine code"
    compatible = [c for c in sass if c.isdigit() and int(c) // 10 == major and int(c) % 10 <= minor]
    if compatible:
        best = max(compatible, key=int)
        return "sass", f"sm_{best} machine code (binary compatible with sm_{major}{minor})"
    jit = [c for c in ptx if c.isdigit() and int(c) <= target]
    if jit:
        best = max(jit, key=int)
        return "ptx", (
            f"no sm_{major}{minor} machine code: the driver JIT-compiles the compute_{best} PTX at first use "
            f"(a slower first call; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor} to avoid it)"
        )
    return "none", (
        f"no kernel image for sm_{major}{minor} (built for {', '.join(plan_or_stamp.get('sass', [])) or 'nothing'}): "
        f"the CUDA kernels cannot run on this GPU; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}"
    )


def stamp(torch_version: str, with_cuda: bool, cuda: Optional[dict] = None, not_built: Optional[str] = None) -> dict:
    """What the library was built against (written to STAMP_NAME beside it).

    cuda: {"arch_list", "sass", "ptx", "source", "dropped", "nvcc"} of a CUDA build (cuda_arch_plan
    plus the nvcc version); not_built: what was left out and why (e.g. the CUDA kernels without a GPU).
    """
    data = {"torch": torch_version, "cuda_kernels": bool(with_cuda), "python": "{}.{}".format(*sys.version_info[:2])}
    if with_cuda and cuda:
        data["cuda"] = dict(cuda)
    if not_built:
        data["not_built"] = not_built
    return data


def write_stamp(
    lib_dir: str, torch_version: str, with_cuda: bool, cuda: Optional[dict] = None, not_built: Optional[str] = None
) -> str:
    path = os.path.join(lib_dir, STAMP_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stamp(torch_version, with_cuda, cuda, not_built), f)
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
