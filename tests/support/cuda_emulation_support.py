"""Helpers of the host-emulation tests of the CUDA kernels (tests/backends/test_cuda_emulation.py,
tests/backends/test_cuda_emulation_index.py): building tests/support/cuda_host_emulation.cpp with the host compiler,
calling it through ctypes on numpy arrays or torch CPU tensors, and the oracle's expected values.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

import oracle
from repo import ROOT

EMULATION_SRC = ROOT / "tests" / "support" / "cuda_host_emulation.cpp"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

_LIBRARY: dict[str, ctypes.CDLL] = {}  # the built emulation, once per session


def emulation_library(tmp_path_factory) -> ctypes.CDLL:
    """tests/support/cuda_host_emulation.cpp built with the host compiler (no CUDA needed), once per session."""
    if "so" in _LIBRARY:
        return _LIBRARY["so"]
    if CXX is None:
        pytest.skip("no host C++ compiler to build the CUDA host emulation")
    lib = tmp_path_factory.mktemp("emu") / "emu.so"
    cmd = [
        CXX,
        "-std=c++17",
        "-O2",
        "-shared",
        "-fPIC",
        "-ffp-contract=off",
        "-DPNI_EMU_WITH_C10",
        f"-I{cpp_extension.include_paths()[0]}",
        "-o",
        str(lib),
        str(EMULATION_SRC),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    so = ctypes.CDLL(str(lib))
    so.emu_set_index_bits.argtypes = [ctypes.c_int]
    so.emu_fastdiv.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    so.emu_stage2_block.argtypes = [ctypes.c_int64] * 3
    so.emu_stage2_block.restype = ctypes.c_int
    for fn in (so.emu_perturb, so.emu_alpha_grad):
        fn.restype = ctypes.c_int
        # dtype, count, 10 pointers (in, out, alpha, sigma, sigma_float, n, n_alpha, inner, offset, seeds), state
        fn.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 10 + [ctypes.c_void_p]
    _LIBRARY["so"] = so
    return so


def _ptrs(arrays) -> ctypes.Array:
    return (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])


def _i64(values) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def _seeds(seed, count: int) -> ctypes.Array:
    """Each tensor's Philox key: ``seed`` (an int shared by all, or one per tensor) as a uint64 array."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * count
    assert len(seeds) == count
    return (ctypes.c_uint64 * max(1, count))(*seeds)


def _state(state):
    """rng_state for the emulation: None, or (seed, counter base) as an int64[2] ctypes array."""
    return None if state is None else (ctypes.c_int64 * 2)(*state)


def run_emulation(so, fn_name, ins, alphas, sigmas, offsets, inners, seed, out_like, state=None):
    """Call emu_perturb / emu_alpha_grad on lists of numpy arrays; returns the outputs.

    alphas and the alpha-gradient outputs (out_like) are float32 (float64 for float64 inputs),
    as the CUDA launcher passes them."""
    dtype = ins[0].dtype if ins else np.float32
    outs = [np.full(o.shape, np.nan, dtype=dtype) for o in out_like]
    code = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}[np.dtype(dtype)]
    keep = (ins, alphas, sigmas)  # noqa: F841  (arrays stay alive during the call)
    rc = getattr(so, fn_name)(
        ctypes.c_int(code),
        ctypes.c_int(len(ins)),
        _ptrs(ins),
        _ptrs(outs),
        _ptrs(alphas),
        _ptrs(sigmas),
        (ctypes.c_int32 * max(1, len(ins)))(*[int(s.dtype == np.float32) for s in sigmas]),
        _i64([a.size for a in ins]),
        _i64([a.size for a in alphas]),
        _i64(inners),
        _i64(offsets),
        _seeds(seed, len(ins)),
        _state(state),
    )
    assert rc == 0
    return outs


# (numel, alpha numel, inner): every stage-1 mode of the CUDA kernel and odd sizes.
EMU_CASES = {
    "layerwise-tiny-thread-mode": (7, 1, 1),
    "layerwise-warp-many-chunks": (100_003, 1, 1),
    "conv-channelwise-warp": (16 * 72, 16, 72),
    "linear-rows-3-chunks": (3 * 5000, 3, 5000),
    "elementwise-direct": (231, 231, 1),
    "act-7x7-thread-mode": (4 * 6 * 49, 6, 49),
    "act-32x32-warp": (2 * 3 * 1024, 3, 1024),
    "per-feature-thread-mode": (9 * 13, 13, 1),
    "unaligned-rows": (5 * 70, 5, 70),
}
SEED, OFFSET = 0x1234_5678_9ABC, 2**32 - 7
kChunk = 2048  # csrc/cuda/perturb_impl.cuh: elements per stage-1 warp task


def run_emulation_torch(so, fn_name, ins, alphas, sigmas, offsets, inners, seed, out_like, state=None):
    """_run for torch CPU tensors (ins: any of float32/float64/float16/bfloat16; alphas and the
    alpha-gradient outputs in the math dtype: float32, float64 for float64)."""
    code = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}[ins[0].dtype]
    outs = [torch.full_like(o, float("nan")) for o in out_like]
    ptrs = lambda ts: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
    rc = getattr(so, fn_name)(
        ctypes.c_int(code),
        ctypes.c_int(len(ins)),
        ptrs(ins),
        ptrs(outs),
        ptrs(alphas),
        ptrs(sigmas),
        (ctypes.c_int32 * len(ins))(*[int(s.dtype == torch.float32) for s in sigmas]),
        _i64([t.numel() for t in ins]),
        _i64([t.numel() for t in alphas]),
        _i64(inners),
        _i64(offsets),
        _seeds(seed, len(ins)),
        _state(state),
    )
    assert rc == 0
    return outs


def oracle_expected(kind, v, alpha, sigma, inner, seed=SEED, offset=OFFSET):
    z = oracle.normal(seed, offset, v.size).astype(np.float64)
    k = (np.arange(v.size) // inner) % alpha.size
    if kind == "out":
        return v.astype(np.float64) + alpha.astype(np.float64)[k] * float(sigma) * z
    out = np.zeros(alpha.size)
    np.add.at(out, k, v.astype(np.float64) * z)
    return out * float(sigma)
