"""The CUDA build says what it does (issue 24): FORCE_CUDA=1 means CUDA kernels or a failed build.

What runs here, without a GPU and with the CPU build of torch (all fast, nothing is compiled):

* the pure rules of pni_fast/_build_config.py: the FORCE_CUDA decision, TORCH_CUDA_ARCH_LIST
  parsing, the architecture plan (override, visible GPUs, the default list filtered by what nvcc
  and torch support), the -gencode flags, which GPU runs which code, the stamp;
* setup.py itself, with `setup()` captured, against a stubbed CUDA torch that sees no GPU and a
  stub nvcc: the default list ends up as explicit -gencode flags (so torch's own detection, which
  raises IndexError without a GPU, never runs), TORCH_CUDA_ARCH_LIST overrides it, and every case
  that cannot give CUDA kernels under FORCE_CUDA=1 stops with one message;
* a real `FORCE_CUDA=1 pip wheel --no-build-isolation` with the CPU torch: fails, says why, no wheel;
* the build backend's notice of what a build left out, and `_ext.status_message()` naming the
  architectures and warning about a GPU without machine code.

The full CUDA build (a CUDA torch of several GB, 10+ minutes) is scripts/cuda_build_check.sh.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pni_fast import _build_config as cfg
from pni_fast import _ext

from repo import ROOT

NVCC13_CODES = {"75", "80", "86", "87", "88", "89", "90", "100", "103", "110", "120", "121"}
TORCH_2_14_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
BUILD_ENV = ("FORCE_CUDA", "FORCE_ONLY_CPU", "PNI_FAST_SKIP_BUILD", "TORCH_CUDA_ARCH_LIST", cfg.NOTICE_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for name in BUILD_ENV:
        monkeypatch.setenv(name, "")  # recorded, so the test's own settings are undone afterwards
        monkeypatch.delenv(name)
    return monkeypatch


# --- the FORCE_CUDA decision ----------------------------------------------------------------------


def test_force_cuda_never_yields_a_cpu_only_build(clean_env, tmp_path):
    home = str(_stub_nvcc(tmp_path).parent.parent)
    clean_env.setenv("FORCE_CUDA", "1")
    with pytest.raises(cfg.BuildError, match=r"CPU-only build.*Install a CUDA build of torch"):
        cfg.want_cuda("csrc", False, home, None)
    with pytest.raises(cfg.BuildError, match=r"nvcc was not found: set CUDA_HOME"):
        cfg.want_cuda("csrc", False, None, "13.0")
    with pytest.raises(cfg.BuildError, match="no CUDA sources"):
        cfg.want_cuda(str(ROOT / "no_such_dir"), True, home, "13.0")
    if sys.platform.startswith("linux"):
        with pytest.raises(cfg.BuildError, match=r"FORCE_CUDA=1, but CUDA_HOME=.* has nvcc but no .*libcudart"):
            cfg.want_cuda(str(ROOT / "csrc"), False, str(tmp_path / "bare"), "13.0")
    assert cfg.want_cuda(str(ROOT / "csrc"), False, home, "13.0") == (True, "FORCE_CUDA=1")
    clean_env.setenv("FORCE_ONLY_CPU", "1")
    with pytest.raises(cfg.BuildError, match="both set"):
        cfg.want_cuda(str(ROOT / "csrc"), False, home, "13.0")


def test_without_force_cuda_the_detection_says_why(clean_env, tmp_path):
    src = str(ROOT / "csrc")
    home = str(_stub_nvcc(tmp_path).parent.parent)
    assert cfg.want_cuda(src, False, home, None) == (False, "this torch has no CUDA support (a CPU-only build)")
    ok, why = cfg.want_cuda(src, False, home, "13.0")
    assert not ok and "torch sees no GPU" in why and "FORCE_CUDA=1" in why
    assert cfg.want_cuda(src, True, None, "13.0")[0] is False
    assert cfg.want_cuda(src, True, home, "13.0") == (True, "GPU and nvcc found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the libcudart check is for Linux")
def test_a_cuda_home_without_libcudart_is_caught_before_compiling(tmp_path):
    """torch takes CUDA_HOME from the folder above nvcc: a wrapper /usr/local/bin/nvcc gives /usr/local,
    where everything compiles (26 min on 2 cores, measured) and only the link fails on -lcudart."""
    wrapper_home = tmp_path / "usr_local"
    (wrapper_home / "bin").mkdir(parents=True)
    (wrapper_home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    toolkit = str(_stub_nvcc(tmp_path / "cuda").parent.parent)
    why = cfg.cuda_toolkit_problem(str(wrapper_home), candidates=(toolkit,))
    assert why.endswith(f"set CUDA_HOME={toolkit}") and "libcudart" in why
    assert "toolkit's root folder" in cfg.cuda_toolkit_problem(str(wrapper_home), candidates=())
    assert cfg.cuda_toolkit_problem(toolkit) is None
    assert cfg.cuda_toolkit_problem(str(wrapper_home), platform="win32") is None
    ok, reason = cfg.want_cuda(str(ROOT / "csrc"), True, str(wrapper_home), "13.0")
    assert not ok and "libcudart" in reason  # without FORCE_CUDA: a CPU build that says why


# --- architectures ---------------------------------------------------------------------------------


def test_parse_arch_list_forms():
    assert cfg.parse_arch_list("8.0;9.0+PTX") == [("80", False), ("90", True)]
    assert cfg.parse_arch_list("8.6 8.9, 10.0a") == [("86", False), ("89", False), ("100a", False)]
    assert cfg.parse_arch_list("Hopper") == [("90", True)]
    assert cfg.parse_arch_list("Ampere;Ada") == [("80", False), ("86", True), ("89", True)]
    for bad in ("sm_90", "9", "9.0+ptx", "Kepler", ";"):
        with pytest.raises(cfg.BuildError, match="TORCH_CUDA_ARCH_LIST"):
            cfg.parse_arch_list(bad)


def test_default_list_without_a_gpu_is_documented_and_filtered_by_nvcc_and_torch():
    assert cfg.DEFAULT_CUDA_ARCHS == ("8.0", "8.6", "8.9", "9.0", "10.0")
    plan = cfg.cuda_arch_plan(None, [], NVCC13_CODES, TORCH_2_14_ARCHS)
    assert plan["arch_list"] == "8.0;8.6;8.9;9.0;10.0+PTX"
    assert plan["sass"] == ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100"] and plan["ptx"] == ["compute_100"]
    assert "default list" in plan["source"] and plan["dropped"] == []
    # an nvcc without sm_100 (CUDA 12.6): dropped, recorded, PTX moves to the highest kept
    plan = cfg.cuda_arch_plan("", [], NVCC13_CODES - {"100"}, [])
    assert plan["arch_list"] == "8.0;8.6;8.9;9.0+PTX" and plan["dropped"] == ["10.0 (not built by this nvcc)"]
    # a torch built only for sm_90: 8.x cannot run torch itself, so it is not built either
    plan = cfg.cuda_arch_plan(None, [], NVCC13_CODES, ["sm_90"])
    assert plan["sass"] == ["sm_90"] and len(plan["dropped"]) == 4
    # unknown nvcc support (nvcc --list-gpu-code failed): the list as it is
    assert cfg.cuda_arch_plan(None, [], None)["arch_list"] == "8.0;8.6;8.9;9.0;10.0+PTX"
    with pytest.raises(cfg.BuildError, match="set TORCH_CUDA_ARCH_LIST"):
        cfg.cuda_arch_plan(None, [], {"75"})


def test_torch_cuda_arch_list_overrides_and_is_checked_against_nvcc():
    plan = cfg.cuda_arch_plan("9.0", [(8, 0)], NVCC13_CODES, TORCH_2_14_ARCHS)
    assert plan == {
        "arch_list": "9.0",
        "sass": ["sm_90"],
        "ptx": [],
        "source": "TORCH_CUDA_ARCH_LIST=9.0",
        "dropped": [],
    }
    with pytest.raises(cfg.BuildError, match=r"asks for 5\.0, 6\.1, which this nvcc cannot build"):
        cfg.cuda_arch_plan("5.0;6.1;9.0", [], NVCC13_CODES)


def test_visible_gpus_are_built_for_clamped_to_nvcc():
    plan = cfg.cuda_arch_plan(None, [(9, 0), (8, 0), (9, 0)], NVCC13_CODES)
    assert plan["arch_list"] == "8.0;9.0+PTX" and "visible GPUs" in plan["source"]
    assert cfg.cuda_arch_plan("native", [(9, 0)], NVCC13_CODES)["arch_list"] == "9.0+PTX"
    plan = cfg.cuda_arch_plan(None, [(12, 1)], {"80", "90", "100"})  # a GPU newer than nvcc: PTX of 10.0
    assert plan["arch_list"] == "10.0+PTX" and plan["dropped"]
    # "native" without a GPU falls back to the default list
    assert cfg.cuda_arch_plan("native", [], NVCC13_CODES)["arch_list"] == "8.0;8.6;8.9;9.0;10.0+PTX"


def test_gencode_flags_keep_torchs_own_arch_detection_out():
    plan = cfg.cuda_arch_plan("8.0;9.0+PTX", [], None)
    flags = cfg.gencode_flags(plan)
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    from torch.utils import cpp_extension

    # torch adds no arch flags of its own once these are there (without them and without a GPU,
    # torch <= 2.14 raises IndexError): what setup.py and the JIT build pass
    assert cpp_extension._get_cuda_arch_flags(cfg.nvcc_flags() + flags) == []


def test_nvcc_threads_share_the_cpus():
    assert cfg.nvcc_thread_flags(6, 4, 16) == ["--threads=4"]
    assert cfg.nvcc_thread_flags(6, 4, 2) == []
    assert cfg.nvcc_thread_flags(2, 1, 64) == ["--threads=2"]
    assert cfg.nvcc_thread_flags(6, 4, None) == []


@pytest.mark.parametrize(
    "cap, kind, text",
    [
        ((9, 0), "sass", "sm_90 machine code"),
        ((8, 7), "sass", "sm_86 machine code (binary compatible with sm_87)"),
        ((12, 0), "ptx", "JIT-compiles the compute_100 PTX"),
        ((10, 3), "sass", "sm_100 machine code (binary compatible with sm_103)"),
        ((11, 0), "ptx", "TORCH_CUDA_ARCH_LIST=11.0"),
        ((7, 5), "none", "no kernel image for sm_75"),
    ],
)
def test_which_code_runs_on_which_gpu(cap, kind, text):
    plan = cfg.cuda_arch_plan(None, [], NVCC13_CODES, TORCH_2_14_ARCHS)
    got_kind, got_text = cfg.runs_on(plan, cap)
    assert got_kind == kind and text in got_text, got_text


def test_nvcc_codes_and_version_from_a_stub_nvcc(tmp_path):
    nvcc = _stub_nvcc(tmp_path)
    assert cfg.nvcc_path(str(tmp_path)) == str(nvcc)
    assert cfg.nvcc_gpu_codes(str(nvcc)) == NVCC13_CODES
    assert cfg.nvcc_version(str(nvcc)) == "13.0"
    assert cfg.nvcc_path(str(tmp_path / "none")) is None and cfg.nvcc_gpu_codes(None) is None


def test_stamp_records_the_architectures(tmp_path):
    plan = dict(cfg.cuda_arch_plan(None, [], NVCC13_CODES), nvcc="13.0")
    cfg.write_stamp(str(tmp_path), "2.14.1+cu130", True, plan)
    data = cfg.read_stamp(str(tmp_path))
    assert data["cuda_kernels"] is True and data["cuda"]["arch_list"] == "8.0;8.6;8.9;9.0;10.0+PTX"
    assert data["cuda"]["nvcc"] == "13.0" and "not_built" not in data
    cfg.write_stamp(str(tmp_path), "2.14.1+cu130", False, None, "CUDA kernels not built: torch sees no GPU")
    data = cfg.read_stamp(str(tmp_path))
    assert data["cuda_kernels"] is False and "cuda" not in data and "no GPU" in data["not_built"]


# --- setup.py against a stubbed CUDA torch without a GPU --------------------------------------------


def _stub_nvcc(folder: Path) -> Path:
    nvcc = folder / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    codes = " ".join(f"sm_{c}" for c in sorted(NVCC13_CODES, key=int))
    nvcc.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        case "$1" in
          --list-gpu-code) for c in {codes}; do echo $c; done ;;
          --version) echo "Cuda compilation tools, release 13.0, V13.0.88" ;;
          *) echo "stub nvcc: $*" >&2; exit 1 ;;
        esac
        """)
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    lib = folder / "lib64"
    lib.mkdir(exist_ok=True)
    (lib / "libcudart.so").write_text("")  # what the link needs (cuda_toolkit_problem)
    return nvcc


def _run_setup(
    monkeypatch, capsys, tmp_path: Path, torch_cuda: str = "13.0", nvcc: bool = True, **env: str
) -> tuple[dict, str]:
    """Run setup.py in this process with setup() captured, torch stubbed as a CUDA build seeing no GPU."""
    import runpy

    import setuptools
    from torch.utils import cpp_extension

    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    if torch_cuda != "none":
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(TORCH_2_14_ARCHS))
    home = tmp_path / "cuda"
    if nvcc:
        _stub_nvcc(home)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home) if nvcc else None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    except SystemExit as e:
        return {"exit": str(e.code)}, capsys.readouterr().err
    ext = captured["ext_modules"][0] if captured["ext_modules"] else None
    got = {
        "nvcc": ext.extra_compile_args.get("nvcc") if ext else None,
        "cuda_sources": [f for f in ext.sources if f.endswith(".cu")] if ext else [],
        "notice": os.environ.get(cfg.NOTICE_ENV),
    }
    return got, capsys.readouterr().err


def test_force_cuda_without_gpu_builds_the_default_list(clean_env, capsys, tmp_path):
    got, log = _run_setup(clean_env, capsys, tmp_path, FORCE_CUDA="1")
    assert "exit" not in got, got
    gencode = [f for f in got["nvcc"] if f.startswith("-gencode")]
    assert gencode == cfg.gencode_flags(cfg.cuda_arch_plan(None, [], NVCC13_CODES, TORCH_2_14_ARCHS))
    assert "-gencode=arch=compute_100,code=compute_100" in gencode and len(gencode) == 6
    assert got["cuda_sources"], "the CUDA sources are compiled"
    assert "GPU architectures 8.0;8.6;8.9;9.0;10.0+PTX from the default list" in log
    assert "nvcc 13.0" in log and got["notice"] is None


def test_torch_cuda_arch_list_overrides_the_default_in_setup_py(clean_env, capsys, tmp_path):
    got, log = _run_setup(clean_env, capsys, tmp_path, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0")
    assert [f for f in got["nvcc"] if f.startswith("-gencode")] == ["-gencode=arch=compute_90,code=sm_90"]
    assert "GPU architectures 9.0 from TORCH_CUDA_ARCH_LIST=9.0" in log


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(torch_cuda="none"), "the installed torch is a CPU-only build"),
        (dict(nvcc=False), "nvcc was not found: set CUDA_HOME"),
        (dict(TORCH_CUDA_ARCH_LIST="5.2"), "TORCH_CUDA_ARCH_LIST=5.2 asks for 5.2"),
        (dict(FORCE_ONLY_CPU="1"), "FORCE_CUDA=1 and FORCE_ONLY_CPU=1 are both set"),
        (dict(PNI_FAST_SKIP_BUILD="1"), "FORCE_CUDA=1 and PNI_FAST_SKIP_BUILD=1 are both set"),
    ],
    ids=["cpu-torch", "no-nvcc", "arch-nvcc-cannot-build", "force-only-cpu", "skip-build"],
)
def test_force_cuda_that_cannot_be_met_stops_with_one_message(clean_env, capsys, tmp_path, kwargs, message):
    got, _ = _run_setup(clean_env, capsys, tmp_path, FORCE_CUDA="1", **kwargs)
    assert "exit" in got and got["exit"].strip().startswith("pni_fast: ERROR: "), got
    assert message in got["exit"]


def test_default_build_with_cuda_torch_and_no_gpu_says_what_it_left_out(clean_env, capsys, tmp_path):
    got, _ = _run_setup(clean_env, capsys, tmp_path)
    assert got["cuda_sources"] == [] and got["nvcc"] is None
    assert got["notice"].startswith("built the CPU kernels only; CUDA kernels not built: torch sees no GPU")
    assert "FORCE_CUDA=1 builds them anyway" in got["notice"]


def test_default_build_with_cpu_torch_prints_no_cuda_notice(clean_env, capsys, tmp_path):
    got, _ = _run_setup(clean_env, capsys, tmp_path, torch_cuda="none")
    assert got["notice"] is None and got["cuda_sources"] == []


def _setup_namespace(monkeypatch) -> dict:
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("FORCE_ONLY_CPU", "1")
    return runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")


class _FailingBuild:
    def __init__(self, *args, **kwargs):
        self.extensions = []

    def run(self):
        raise RuntimeError("nvcc died: error: stub")


def test_failed_compile_under_force_cuda_is_an_error_even_for_pip_install(clean_env):
    ns = _setup_namespace(clean_env)
    cls = ns["_build_ext_class"](_FailingBuild, torch.__version__, True, None, None)
    clean_env.setenv("PNI_FAST_BUILD_OPTIONAL", "1")  # what the backend's build_wheel sets
    clean_env.setenv("FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="nvcc died"):
        cls().run()
    # without FORCE_CUDA, `pip install .` installs without the kernels and hands over the notice
    clean_env.delenv("FORCE_CUDA")
    build = cls()
    build.distribution = type("D", (), {"ext_modules": ["x"]})()
    build.run()
    notice = os.environ[cfg.NOTICE_ENV]
    assert "compiling the C++ kernels FAILED (RuntimeError: nvcc died: error: stub)" in notice
    assert "installed WITHOUT them" in notice and build.distribution.ext_modules == []


# --- a real pip build with the CPU torch --------------------------------------------------------------


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if os.path.isfile(ROOT / rel):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs the CPU build of torch")
def test_force_cuda_pip_wheel_with_cpu_torch_fails_loudly(tmp_path):
    src = tmp_path / "src"
    _copy_tree(src)
    env = {k: v for k, v in os.environ.items() if k not in BUILD_ENV}
    env.update(FORCE_CUDA="1")
    dist = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "pni_fast: ERROR: FORCE_CUDA=1, but the installed torch is a CPU-only build" in out, out[-3000:]
    assert not list(dist.glob("*.whl"))


# --- the build backend's notice ------------------------------------------------------------------------


def _load_backend():
    path = ROOT / "build_backend" / "pni_fast_build.py"
    spec = importlib.util.spec_from_file_location("backend_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backend_hands_what_the_build_left_out_to_pip_as_a_warning(clean_env, capsys):
    backend = _load_backend()
    assert backend.NOTICE_ENV == cfg.NOTICE_ENV
    clean_env.setattr(backend, "frontend_shows_warnings", lambda: True)  # pip >= 25.3
    clean_env.setenv(cfg.NOTICE_ENV, "stale notice of an earlier build")
    note = "built the CPU kernels only; CUDA kernels not built: torch sees no GPU"

    def build(name):
        os.environ[cfg.NOTICE_ENV] = note
        return name

    with pytest.warns(UserWarning, match=f"^pni_fast: NOTE: {note}$"):
        assert backend._build_announced(build, "x.whl") == "x.whl"
    assert f"pni_fast: NOTE: {note}" in capsys.readouterr().err
    assert cfg.NOTICE_ENV not in os.environ
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a build with nothing left out says nothing
        assert backend._build_announced(lambda: "quiet.whl") == "quiet.whl"


def test_backend_falls_back_to_the_terminal_for_older_pip(tmp_path, clean_env):
    backend = _load_backend()
    clean_env.setattr(backend, "frontend_shows_warnings", lambda: False)
    tty = tmp_path / "tty"
    assert backend.announce("x y", tty_path=str(tty)) == "tty"
    assert tty.read_text() == "\npni_fast: NOTE: x y\n"
    assert backend.announce("x", tty_path=str(tmp_path / "no" / "tty")) == "log"  # no terminal (CI): log only


def test_pips_hook_runner_is_recognized():
    """The check looks for what pyproject_hooks' in-process runner does with a hook's warnings."""
    backend = _load_backend()
    pip_dir = Path(importlib.util.find_spec("pip").origin).parent
    runner = pip_dir / "_vendor" / "pyproject_hooks" / "_in_process" / "_in_process.py"
    if not runner.is_file():
        pytest.skip("this pip has no vendored pyproject_hooks runner")
    shows = "catch_warnings(record=True)" in runner.read_text()
    main = sys.modules["__main__"]
    old = getattr(main, "__file__", None)
    try:
        main.__file__ = str(runner)
        assert backend.frontend_shows_warnings() is shows
    finally:
        if old is None:
            del main.__file__
        else:
            main.__file__ = old


# --- python -m pni_fast info: the architectures and a GPU without machine code -------------------------------


@pytest.fixture
def cuda_stamp(tmp_path, monkeypatch):
    plan = dict(cfg.cuda_arch_plan(None, [], NVCC13_CODES, TORCH_2_14_ARCHS), nvcc="13.0")
    cfg.write_stamp(str(tmp_path), torch.__version__, True, plan)
    _ext.load()
    monkeypatch.setitem(_ext._state, "loaded", True)
    monkeypatch.setitem(_ext._state, "lib_dir", str(tmp_path))
    monkeypatch.setitem(_ext._state, "jit_cuda", None)
    monkeypatch.setattr(_ext, "has_cuda", lambda: True)
    return monkeypatch


def _fake_gpu(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Stub GPU")


def test_status_names_the_architectures_of_the_stamp(cuda_stamp):
    assert _ext.build_archs()["arch_list"] == "8.0;8.6;8.9;9.0;10.0+PTX"
    msg = _ext.status_message()
    assert "with CUDA kernels for sm_80, sm_86, sm_89, sm_90, sm_100 + PTX compute_100 (the default list" in msg
    assert "WARNING" not in msg  # no GPU visible here


def test_status_warns_for_a_gpu_without_machine_code(cuda_stamp):
    _fake_gpu(cuda_stamp, (12, 0))
    assert _ext.gpu_arch_warnings() == [
        "WARNING: cuda:0 (Stub GPU): no sm_120 machine code: the driver JIT-compiles the compute_100 PTX at first use "
        "(a slower first call; rebuild with TORCH_CUDA_ARCH_LIST=12.0 to avoid it)"
    ]
    assert "WARNING: cuda:0 (Stub GPU): no sm_120" in _ext.status_message()
    _fake_gpu(cuda_stamp, (9, 0))
    assert _ext.gpu_arch_warnings() == []
    _fake_gpu(cuda_stamp, (7, 5))
    assert "no kernel image for sm_75" in _ext.gpu_arch_warnings()[0]


def test_status_of_a_cpu_only_build_says_what_was_not_built(tmp_path, monkeypatch):
    cfg.write_stamp(str(tmp_path), torch.__version__, False, None, "CUDA kernels not built: torch sees no GPU")
    _ext.load()
    monkeypatch.setitem(_ext._state, "loaded", True)
    monkeypatch.setitem(_ext._state, "lib_dir", str(tmp_path))
    monkeypatch.setattr(_ext, "has_cuda", lambda: False)
    assert "(CUDA kernels not built: torch sees no GPU)" in _ext.status_message()


# --- the supported torch range ------------------------------------------------------------------------------


def test_pyproject_declares_the_supported_torch_and_triton_range():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["dependencies"] == ["torch>={}.{}".format(*cfg.TORCH_MIN)]
    assert project["optional-dependencies"]["triton"] == ["triton>={}.{}".format(*cfg.TRITON_MIN)]
    assert cfg.TORCH_MIN == (2, 11) and cfg.TRITON_MIN == (3, 6)  # the GPU image targeted first


def test_the_running_torch_is_in_the_supported_range():
    note = cfg.torch_support_note(torch.__version__)
    assert note.startswith(f"torch {torch.__version__} supported"), note
    assert cfg.torch_support_note("2.10.1", "3.5.0").count("WARNING") == 2
    assert "untested" in cfg.torch_support_note("2.15.0")
