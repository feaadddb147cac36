"""Loading the compiled kernels: AOT module, JIT fallback switches, pure-PyTorch fallback."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from pni_fast import _build_config as cfg
from pni_fast import _ext

from repo import ROOT


def test_sources_are_found_for_the_jit_build():
    src = _ext.source_dir()
    assert src is not None
    for name in ("ops.cpp", "philox.h", "checks.h", os.path.join("cpu", "perturb_cpu.cpp")):
        assert os.path.isfile(os.path.join(src, name)), name


def test_jit_name_is_keyed_by_torch_version():
    name = _ext._jit_name(with_cuda=False)
    assert name.isidentifier()
    assert torch.__version__.split("+")[0].replace(".", "_") in name


def test_loaded_library_has_every_op():
    if _ext.available():
        assert _ext._missing_ops() == []
        assert _ext.has_op("sigma", "cpu") and _ext.has_op("perturb")
        assert not _ext.has_op("no_such_op")
        assert _ext.has_op("perturb", "cuda") == _ext.has_cuda()
        assert "stale" not in _ext.status_message()


def test_status_message_says_where_the_ops_came_from():
    msg = _ext.status_message()
    assert isinstance(msg, str) and msg
    if _ext.available():
        assert "pni_fast" in msg or "JIT" in msg
        assert torch.ops.pni_fast.cpu_isa() in ("avx512", "avx2", "generic")
        assert "CPU SIMD" in msg


_NO_EXT_SCRIPT = """
import sys, warnings
import importlib.metadata
sys.modules["pni_fast._C"] = None  # simulate a missing / unloadable AOT build ...
importlib.metadata.distributions = lambda *a, **k: []  # ... and no installed copy to borrow it from
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import pni_fast
    from pni_fast import _ext
    assert _ext.load() is False and _ext.available() is False and _ext.has_cuda() is False
    _ext.load()
    w = torch.randn(8, 4)
    out = pni_fast.noisy_weight(w, torch.tensor(0.25), seed=3)
    assert out.shape == w.shape and not torch.equal(out, w)
ours = [w for w in caught if "C++ kernels unavailable" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert "PNI_FAST_NO_JIT" in _ext.status_message(), _ext.status_message()
print("ok")
"""


def test_missing_extension_falls_back_with_one_warning():
    env = dict(os.environ, PNI_FAST_NO_JIT="1")
    env.pop("PNI_FAST_BACKEND", None)
    res = subprocess.run(
        [sys.executable, "-c", _NO_EXT_SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


# --- one build configuration (pni_fast/_build_config.py) for setup.py and the JIT build ----------------

_SETUP_SCRIPT = """
import json, runpy, sys
import setuptools
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)  # setup.py's `from setuptools import setup` sees this
runpy.run_path("setup.py", run_name="__main__")
ext = captured["ext_modules"][0]
print(json.dumps({"sources": ext.sources, "cxx": ext.extra_compile_args["cxx"], "ld": ext.extra_link_args,
                  "macros": [list(m) for m in ext.define_macros], "include_dirs": ext.include_dirs,
                  "pni_fast_imported": any(m == "pni_fast" or m.startswith("pni_fast.") for m in sys.modules)}))
"""


def _load_build_config_by_path():
    spec = importlib.util.spec_from_file_location("_cfg_for_test", os.path.join(ROOT, "pni_fast", "_build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_py_takes_sources_and_flags_from_the_build_config_without_importing_pni_fast():
    env = dict(os.environ, FORCE_ONLY_CPU="1")
    for name in ("PNI_FAST_SKIP_BUILD", "PNI_FAST_EXTRA_CXXFLAGS", "PNI_FAST_EXTRA_LDFLAGS"):
        env.pop(name, None)
    res = subprocess.run(
        [sys.executable, "-c", _SETUP_SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    by_path = _load_build_config_by_path()
    assert got["pni_fast_imported"] is False
    assert got["sources"] == by_path.cpu_sources("csrc")
    assert got["cxx"] == by_path.cxx_flags() and got["ld"] == by_path.ld_flags()
    assert got["macros"] == [list(m) for m in by_path.define_macros(False)]
    assert os.path.join(ROOT, "csrc") in got["include_dirs"]
    # every CPU source is compiled: a new csrc/cpu/*.cpp needs no edit of a source list
    on_disk = {os.path.relpath(p, ROOT) for p in [os.path.join(ROOT, "csrc", "ops.cpp")]} | {
        os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cpu")) if f.endswith(".cpp")
    }
    assert set(got["sources"]) == on_disk


def test_jit_build_uses_the_same_build_config(monkeypatch):
    from torch.utils import cpp_extension

    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("fake build: stop here")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("FORCE_ONLY_CPU", "1")
    monkeypatch.delenv("PNI_FAST_NO_JIT", raising=False)
    ok, msg = _ext._load_jit()
    assert not ok and "fake build" in msg
    src = _ext.source_dir()
    assert seen["sources"] == cfg.cpu_sources(src)
    assert seen["extra_cflags"] == cfg.cxx_flags()
    assert seen["extra_ldflags"] == cfg.ld_flags()
    assert seen["extra_include_paths"] == cfg.include_dirs(src)
    assert seen["with_cuda"] is False


def test_no_compiler_or_linker_flag_is_spelled_outside_the_build_config():
    # the drift this module removed: setup.py and _ext.py each had their own flag lists
    for rel in ("setup.py", os.path.join("pni_fast", "_ext.py")):
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        for flag in ('"-fopenmp"', '"/openmp"', '"-O3"', '"-ffp-contract=off"'):
            assert flag not in text, f"{rel} spells {flag}; it belongs in pni_fast/_build_config.py"


def test_openmp_flags_per_platform():
    assert "/openmp" in cfg.cxx_flags("win32") and cfg.ld_flags("win32") == []  # MSVC: no -fopenmp to link
    assert "-fopenmp" in cfg.cxx_flags("linux") and "-fopenmp" in cfg.ld_flags("linux")
    assert "-fopenmp" not in cfg.cxx_flags("darwin") and cfg.ld_flags("darwin") == []
    for platform in ("linux", "darwin", "win32"):
        assert not any(f.startswith("-march") or "fast-math" in f for f in cfg.cxx_flags(platform))


# --- the build stamp: a library built against another torch is not loaded ---------------------------


def _fake_library_dir(tmp_path, torch_version=None):
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    if torch_version is not None:
        cfg.write_stamp(str(tmp_path), torch_version, with_cuda=False)
    return str(tmp_path)


def test_stamp_of_another_torch_is_refused_with_both_versions(tmp_path):
    lib_dir = _fake_library_dir(tmp_path, "1.0.0+other")
    why = _ext._stamp_refusal(lib_dir, "pni_fast._C")
    assert why is not None
    assert "1.0.0+other" in why and torch.__version__ in why and "reinstall" in why


def test_stamp_of_this_torch_or_no_stamp_is_accepted(tmp_path):
    assert _ext._stamp_refusal(_fake_library_dir(tmp_path, torch.__version__), "x") is None
    (tmp_path / "_C_build.json").unlink()
    assert _ext._stamp_refusal(str(tmp_path), "x") is None  # an unstamped build: nothing says it mismatches


def test_stamp_without_library_says_nothing(tmp_path):
    cfg.write_stamp(str(tmp_path), "1.0.0+other", with_cuda=False)
    assert _ext._stamp_refusal(str(tmp_path), "x") is None


_MISMATCH_SCRIPT = """
import importlib.metadata, json, os, sys, warnings
importlib.metadata.distributions = lambda *a, **k: []  # no installed copy to borrow a library from
sys.path.insert(0, sys.argv[1])
import pni_fast
from pni_fast import _ext
assert os.path.dirname(pni_fast.__file__) == os.path.join(sys.argv[1], "pni_fast"), pni_fast.__file__
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert _ext.load() is False
assert "pni_fast._C" not in sys.modules, "the mismatching library was imported"
print(_ext.status_message())
"""


def test_library_built_for_another_torch_is_not_imported(tmp_path):
    libs = glob.glob(os.path.join(ROOT, "pni_fast", "_C.*.so"))
    if not libs:
        pytest.skip("no ahead-of-time build in the checkout (pip install --no-build-isolation -e .)")
    pkg = tmp_path / "pni_fast"
    shutil.copytree(os.path.join(ROOT, "pni_fast"), pkg, ignore=shutil.ignore_patterns("__pycache__", "_csrc"))
    cfg.write_stamp(str(pkg), "1.0.0+other", with_cuda=False)
    env = dict(os.environ, PNI_FAST_NO_JIT="1")
    env.pop("PNI_FAST_BACKEND", None)
    res = subprocess.run(
        [sys.executable, "-c", _MISMATCH_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "built against torch 1.0.0+other" in res.stdout and torch.__version__ in res.stdout


# --- the in-tree build backend finds the target environment's torch ----------------------------------


def _load_backend():
    path = os.path.join(ROOT, "build_backend", "pni_fast_build.py")
    spec = importlib.util.spec_from_file_location("_pni_fast_build_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backend_finds_this_environments_torch_from_metadata():
    backend = _load_backend()
    found = backend.find_torch(backend.target_site_dirs())
    assert found is not None
    version, folder = found
    # the metadata may lack torch.__version__'s local part: 2.14.1 for a 2.14.1+cu130 wheel from PyPI
    assert version.split("+")[0] == torch.__version__.split("+")[0]
    assert os.path.samefile(os.path.join(folder, "torch"), os.path.dirname(torch.__file__))


def test_backend_finds_no_torch_where_there_is_none(tmp_path):
    assert _load_backend().find_torch([str(tmp_path)]) is None


def test_pyproject_names_the_in_tree_backend_and_ninja():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build_system = tomllib.load(f)["build-system"]
    assert build_system["build-backend"] == "pni_fast_build"
    assert build_system["backend-path"] == ["build_backend"]
    assert any(r.startswith("ninja") for r in build_system["requires"])
    assert not any(r.split("=")[0].split(">")[0].strip() == "torch" for r in build_system["requires"])


_WHEEL_CHECK = """
import json, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("pni_fast/_C.") and n.endswith(".so")]
stamp = json.loads(zipfile.ZipFile(sys.argv[1]).read("pni_fast/_C_build.json"))
print(json.dumps({"libs": libs, "stamp": stamp}))
"""


@pytest.mark.slow
def test_isolated_pip_wheel_holds_the_library_built_against_this_torch(tmp_path):
    """`pip wheel .` with pip's default build isolation (minutes: compiles every source)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if os.path.isfile(os.path.join(ROOT, rel)):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    env = dict(os.environ, FORCE_ONLY_CPU="1", PNI_FAST_REQUIRE_BUILD="1")
    for name in ("PNI_FAST_SKIP_BUILD", "PIP_NO_BUILD_ISOLATION", "PNI_FAST_EXTRA_CXXFLAGS", "PNI_FAST_EXTRA_LDFLAGS"):
        env.pop(name, None)
    dist = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    wheels = list(dist.glob("pni_fast-*.whl"))
    assert len(wheels) == 1 and "none-any" not in wheels[0].name, wheels
    # every module of the tree is in the wheel (a folder without __init__.py would be left out silently)
    modules = {rel for rel in files if rel.startswith("pni_fast/") and rel.endswith(".py")}
    with zipfile.ZipFile(wheels[0]) as whl:
        assert modules <= set(whl.namelist()), sorted(modules - set(whl.namelist()))
    got = json.loads(
        subprocess.run(
            [sys.executable, "-c", _WHEEL_CHECK, str(wheels[0])], capture_output=True, text=True, check=True
        ).stdout
    )
    assert len(got["libs"]) == 1
    assert got["stamp"]["torch"] == torch.__version__
