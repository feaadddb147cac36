"""Loading the compiled kernels: AOT module, JIT fallback switches, pure-PyTorch fallback."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from pni_fast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    res = subprocess.run([sys.executable, "-c", _NO_EXT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
