"""The CUDA backend without a GPU: nvcc compile check and a host emulation of the kernels.

* Every csrc/cuda/*.cu is compiled with nvcc against the installed torch's headers (design.md
  section 9): a CUDA syntax or type error fails CI on a CPU-only machine. The CPU build of torch
  lacks c10/cuda/impl/cuda_cmake_macros.h (generated when torch is built with CUDA), so a
  one-line stub supplies it.
* tests/cuda_host_emulation.cpp runs the kernels' per-thread bodies (csrc/cuda/perturb_impl.cuh)
  with the kernels' work mapping on the CPU, checked against the numpy oracle.
The real build and the runtime tests (tests/test_cuda.py) happen on a GPU machine.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

import philox_oracle as oracle

ROOT = Path(__file__).resolve().parent.parent
CU_FILES = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
assert CU_FILES, "csrc/cuda/*.cu is missing"


def _nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit): cannot compile-check csrc/cuda")


def _stub_dir(tmp: Path) -> Path:
    """c10/cuda/impl/cuda_cmake_macros.h, missing from CPU builds of torch."""
    macros = tmp / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.write_text("#pragma once\n")
    return tmp / "stub"


def _command(src: str, obj: Path, stub: Path) -> list[str]:
    cmd = [NVCC, "-std=c++20", "-c", src, "-o", str(obj), "-Xcompiler", "-fPIC"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [f"-I{sysconfig.get_paths()['include']}", f"-I{stub}"]
    # the flags torch's CUDAExtension adds (half operators off, relaxed constexpr)
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    # never --use_fast_math: the noise must match the other backends (design.md section 3)
    return cmd


@needs_nvcc
@pytest.mark.parametrize("src", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_file_compiles(src: str, tmp_path: Path):
    text = Path(src).read_text()
    # accurate libm only: the fast intrinsics change z beyond the 2e-6 contract
    assert re.search(r"__(logf|cosf|sinf|expf|fdividef)\s*\(", text) is None
    assert re.search(r"#include\s*[<\"]ATen/cuda/CUDAContext.h", text) is None, (
        "include c10/cuda/CUDAStream.h / CUDAGuard.h instead: CUDAContext.h needs cuBLAS/cuSPARSE headers"
    )
    cmd = _command(src, tmp_path / "out.o", _stub_dir(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for {src}:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0


def _sass_report_module():
    spec = importlib.util.spec_from_file_location("sass_report", ROOT / "benchmarks" / "sass_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sass_report"] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


# SASS instructions per element of the hot loops (benchmarks/sass_report.py's count; sm_90, nvcc 13),
# measured when the kernels were tuned, with a little room. Before: fp32 forward 91.0, fp16 forward
# 94.5, list forward 91.0, fp32 alpha-grad stage 1 75.5 (benchmarks/results/sass_sm90.md).
SASS_LIMITS = {
    "fp32 forward (layerwise alpha)": 60.0,
    "fp32 forward (channelwise alpha)": 76.0,
    "fp32 forward, 64-bit index": 66.0,
    "fp16 forward (layerwise alpha)": 64.0,
    "multi-tensor fp32 forward": 78.0,
    "fp32 alpha-grad stage 1": 60.0,
}


@needs_nvcc
def test_sass_hot_loops(tmp_path):
    """The kernels' SASS: accurate math only, vector accesses, and the hot loops under their budgets."""
    sass_report = _sass_report_module()
    if sass_report.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel's copy): no SASS to count")
    result = sass_report.report(ROOT / "csrc", "sm_90", tmp_path)
    kernels = {k["kernel"]: k for k in result["kernels"]}
    for k in result["kernels"]:
        # MUFU.SIN/COS/LG2/EX2 only come from fast-math intrinsics (__sinf, sin.approx, ...)
        assert k["fast_math_ops"] == [], (k["kernel"], k["fast_math_ops"])
    hot = result["hot_loops"]
    assert set(SASS_LIMITS) <= set(hot), f"hot loops not found: {set(SASS_LIMITS) - set(hot)}"
    for label, limit in SASS_LIMITS.items():
        loop = kernels[hot[label]]["loop"]
        assert loop["per_element"] <= limit, (label, hot[label], loop)
        assert loop["quads"] >= 1 and loop["mufu"] in ([], ["MUFU.RSQ"]), (label, loop)
    # 16-byte load and 16-byte store in the fp32 forward; 8-byte ones for float16
    assert {"LDG.E.128", "STG.E.128"} <= set(kernels[hot["fp32 forward (layerwise alpha)"]]["loop"]["memory"])
    assert {"LDG.E.64", "STG.E.64"} <= set(kernels[hot["fp16 forward (layerwise alpha)"]]["loop"]["memory"])
    # the 32-bit index kernels exist for every forward kind and the stage-1 kernel
    for name in (
        "perturb_kernel<float, int, 0>",
        "perturb_kernel<float, int, 1>",
        "perturb_kernel<float, int, 2>",
        "alpha_grad_partials_kernel<float, int>",
    ):
        assert name in kernels, sorted(kernels)
    # no integer division in the channelwise forward: a divide is a CALL to a subroutine, so the
    # channelwise loops call exactly as often as the layerwise ones (sqrtf's slow path)
    for bits in ("int", "long"):
        assert (
            kernels[f"perturb_kernel<float, {bits}, 1>"]["loop"]["calls"]
            == kernels[f"perturb_kernel<float, {bits}, 0>"]["loop"]["calls"]
        )


def test_no_fast_math_in_build_flags():
    """setup.py must not turn on fast math for the CUDA sources (it would change z)."""
    setup = (ROOT / "setup.py").read_text() if (ROOT / "setup.py").exists() else ""
    for line in setup.splitlines():
        if line.strip().startswith("#"):
            continue
        assert "--use_fast_math" not in line and "-use_fast_math" not in line, line


# ---------------------------------------------------------------------------
# Host emulation of the CUDA kernels (same bodies, same work mapping; no GPU)
# ---------------------------------------------------------------------------

EMULATION_SRC = ROOT / "tests" / "cuda_host_emulation.cpp"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """tests/cuda_host_emulation.cpp built with the host compiler (no CUDA needed)."""
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
        # dtype, count, 9 pointers (in, out, alpha, sigma, sigma_float, n, n_alpha, inner, offset), seed, state
        fn.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 9 + [ctypes.c_uint64, ctypes.c_void_p]
    return so


def _ptrs(arrays) -> ctypes.Array:
    return (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])


def _i64(values) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def _state(state):
    """rng_state for the emulation: None, or (seed, counter base) as an int64[2] ctypes array."""
    return None if state is None else (ctypes.c_int64 * 2)(*state)


def _run(so, fn_name, ins, alphas, sigmas, offsets, inners, seed, out_like, state=None):
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
        ctypes.c_uint64(seed),
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


def _run_torch(so, fn_name, ins, alphas, sigmas, offsets, inners, seed, out_like, state=None):
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
        ctypes.c_uint64(seed),
        _state(state),
    )
    assert rc == 0
    return outs


def _expected(kind, v, alpha, sigma, inner, seed=SEED, offset=OFFSET):
    z = oracle.normal(seed, offset, v.size).astype(np.float64)
    k = (np.arange(v.size) // inner) % alpha.size
    if kind == "out":
        return v.astype(np.float64) + alpha.astype(np.float64)[k] * float(sigma) * z
    out = np.zeros(alpha.size)
    np.add.at(out, k, v.astype(np.float64) * z)
    return out * float(sigma)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(EMU_CASES))
def test_emulated_kernels_match_oracle(emu, case, dtype):
    n, n_alpha, inner = EMU_CASES[case]
    rng = np.random.default_rng(0)
    v = rng.standard_normal(n).astype(dtype)
    alpha = (rng.random(n_alpha) + 0.1).astype(dtype)
    sigma = np.array(0.75, dtype=np.float32)
    (out,) = _run(emu, "emu_perturb", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [v])
    np.testing.assert_allclose(
        out, _expected("out", v, alpha, sigma, inner), rtol=0, atol=2e-6 if dtype == np.float32 else 2e-6 * 0.9
    )
    (grad,) = _run(emu, "emu_alpha_grad", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
    expected = _expected("grad", v, alpha, sigma, inner)
    scale = 1.0 + np.abs(expected).max()
    np.testing.assert_allclose(grad / scale, expected / scale, rtol=0, atol=2e-5 if dtype == np.float32 else 2e-6)


def test_emulated_unaligned_pointers_and_sigma_dtype(emu):
    """Views starting one element in take the scalar (non-vector) path; sigma in v's dtype."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal(1 + 4 * 300).astype(np.float32)
    v = base[1:]  # 4-byte aligned only: no float4 access
    alpha = (rng.random(1 + 4) + 0.1).astype(np.float32)[1:]
    sigma = np.array(0.5, dtype=np.float32)
    (out,) = _run(emu, "emu_perturb", [v], [alpha], [sigma], [3], [300], 5, [v])
    np.testing.assert_allclose(out, _expected("out", v, alpha, sigma, 300, 5, 3), rtol=0, atol=2e-6)
    v64 = v.astype(np.float64)
    a64 = alpha.astype(np.float64)
    s64 = np.array(0.5, dtype=np.float64)
    (grad,) = _run(emu, "emu_alpha_grad", [v64], [a64], [s64], [3], [300], 5, [a64])
    np.testing.assert_allclose(grad, _expected("grad", v64, a64, s64, 300, 5, 3), rtol=1e-6, atol=1e-6)


def test_emulated_multi_equals_single_bitwise(emu):
    """A list of 40 tensors (two packs of at most 32) gives the single-tensor bits for every tensor."""
    rng = np.random.default_rng(2)
    specs = [(16 * 27, 16, 27), (16 * 144, 1, 1), (32 * 144, 32 * 144, 1), (10 * 64, 10, 64), (0, 1, 1)]
    ins, alphas, sigmas, offsets, inners = [], [], [], [], []
    offset = 11
    for i in range(40):
        n, n_alpha, inner = specs[i % len(specs)]
        ins.append(rng.standard_normal(n).astype(np.float32))
        alphas.append((rng.random(n_alpha) + 0.1).astype(np.float32))
        sigmas.append(np.array(0.1 + i / 40, dtype=np.float32))
        offsets.append(offset)
        inners.append(inner)
        offset += (n + 3) // 4
    outs = _run(emu, "emu_perturb", ins, alphas, sigmas, offsets, inners, SEED, ins)
    grads = _run(emu, "emu_alpha_grad", ins, alphas, sigmas, offsets, inners, SEED, alphas)
    for i in range(40):
        if ins[i].size == 0:
            continue  # untouched by the kernels; the op layer returns empty / zeros
        (single,) = _run(
            emu, "emu_perturb", [ins[i]], [alphas[i]], [sigmas[i]], [offsets[i]], [inners[i]], SEED, [ins[i]]
        )
        np.testing.assert_array_equal(outs[i], single)
        (single_g,) = _run(
            emu, "emu_alpha_grad", [ins[i]], [alphas[i]], [sigmas[i]], [offsets[i]], [inners[i]], SEED, [alphas[i]]
        )
        np.testing.assert_array_equal(grads[i], single_g)
        np.testing.assert_allclose(
            outs[i], _expected("out", ins[i], alphas[i], sigmas[i], inners[i], SEED, offsets[i]), rtol=0, atol=2e-6
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", ["conv-channelwise-warp", "elementwise-direct", "act-7x7-thread-mode", "layerwise-warp-many-chunks"]
)
def test_emulated_kernels_16bit(emu, case, dtype):
    """c10::Half / c10::BFloat16 paths (math in float32, 64-bit vector accesses), sigma in v's dtype."""
    n, n_alpha, inner = EMU_CASES[case]
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(n, generator=gen).to(dtype)
    alpha = (torch.rand(n_alpha, generator=gen) + 0.1).to(dtype)
    sigma = torch.tensor(0.75, dtype=dtype)
    (out,) = _run_torch(emu, "emu_perturb", [v], [alpha.float()], [sigma], [OFFSET], [inner], SEED, [v])
    expected = _expected("out", v.double().numpy(), alpha.double().numpy(), 0.75, inner)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=tol, atol=tol)
    (grad,) = _run_torch(emu, "emu_alpha_grad", [v], [alpha.float()], [sigma], [OFFSET], [inner], SEED, [alpha.float()])
    expected = _expected("grad", v.double().numpy(), alpha.double().numpy(), 0.75, inner)
    scale = 1.0 + np.abs(expected).max()
    np.testing.assert_allclose(
        grad.double().numpy() / scale, expected / scale, rtol=0, atol=1e-2 if dtype == torch.float16 else 5e-2
    )


@pytest.mark.parametrize("case", ["conv-channelwise-warp", "elementwise-direct", "per-feature-thread-mode"])
def test_emulated_rng_state(emu, case):
    """rng_state (seed, base): seed replaced, base added to every offset; the seed argument is ignored."""
    n, n_alpha, inner = EMU_CASES[case]
    rng = np.random.default_rng(4)
    v = rng.standard_normal(n).astype(np.float32)
    alpha = (rng.random(n_alpha) + 0.1).astype(np.float32)
    sigma = np.array(0.5, dtype=np.float32)
    seed2, base = 2**40 + 9, 2**33 + 5
    for fn, out_like in (("emu_perturb", v), ("emu_alpha_grad", alpha)):
        (with_state,) = _run(emu, fn, [v], [alpha], [sigma], [OFFSET], [inner], 123, [out_like], state=(seed2, base))
        (plain,) = _run(emu, fn, [v], [alpha], [sigma], [OFFSET + base], [inner], seed2, [out_like])
        np.testing.assert_array_equal(with_state, plain)
    (out,) = _run(emu, "emu_perturb", [v], [alpha], [sigma], [7], [inner], 0, [v], state=(seed2, base))
    np.testing.assert_allclose(out, _expected("out", v, alpha, sigma, inner, seed2, base + 7), rtol=0, atol=2e-6)


def test_emulated_float32_alpha_half_grad_does_not_overflow(emu):
    """float16 grad, float32 alpha (AMP): the gradient stays float32, beyond float16's 65504."""
    n = 1 << 20
    z = torch.from_numpy(oracle.normal(SEED, OFFSET, n))
    g = z.half()  # sum(g * z) ~ n, far above 65504
    alpha = torch.tensor([0.3], dtype=torch.float32)
    sigma = torch.tensor(1.5)
    (grad,) = _run_torch(emu, "emu_alpha_grad", [g], [alpha], [sigma], [OFFSET], [1], SEED, [alpha])
    expected = (g.double() * z.double()).sum().item() * 1.5
    assert expected > 1e5 and np.isfinite(grad.item())
    assert abs(grad.item() - expected) <= 1e-5 * expected


# ---------------------------------------------------------------------------
# Index types, magic-number division, stage-2 block reduction
# ---------------------------------------------------------------------------


@pytest.fixture
def emu_bits(emu):
    """The emulation with a forced index type; back to the launcher's choice afterwards."""
    yield emu
    emu.emu_set_index_bits(0)


@pytest.mark.parametrize("bits", [32, 64])
def test_emulated_fastdiv(emu, bits):
    """x / d by magic numbers equals integer division, at the edges of the index range."""
    top = 2**31 - 1 if bits == 32 else 2**63 - 1
    divisors = [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        25,
        49,
        72,
        641,
        1000,
        4097,
        65535,
        65537,
        2**20 + 1,
        2**30 - 1,
        2**30,
        2**30 + 1,
        2**31 - 1,
    ]
    if bits == 64:
        divisors += [2**31, 2**32 - 1, 2**32 + 1, 3**30, 2**62 - 1, 2**62 + 1, 2**63 - 25]
    rng = np.random.default_rng(7)
    for d in divisors:
        xs = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, top, top - 1, top - (top % d), top - (top % d) - 1]
        xs += [int(v) for v in rng.integers(0, top, size=200, dtype=np.int64)]
        xs += [int(v) * d + r for v in rng.integers(0, top // d + 1, size=50, dtype=np.int64) for r in (0, d - 1)]
        x = np.array([v for v in xs if 0 <= v <= top], dtype=np.int64)
        out = np.zeros_like(x)
        emu.emu_fastdiv(bits, d, x.size, x.ctypes.data, out.ctypes.data)
        np.testing.assert_array_equal(out, x // d, err_msg=f"divisor {d}, {bits}-bit")


# (numel, alpha numel, inner): channelwise with several inner values (forward: magic-number division).
CHANNEL_CASES = [
    (3 * 6 * 1, 6, 1),
    (2 * 6 * 3, 6, 3),
    (4 * 5 * 4, 5, 4),
    (3 * 7 * 5, 7, 5),
    (2 * 6 * 7, 6, 7),
    (2 * 3 * 64, 3, 64),
    (2 * 4 * 1000, 4, 1000),
    (3 * 2 * 4097, 2, 4097),
    (16 * 27, 16, 27),
]


@pytest.mark.parametrize("case", CHANNEL_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CHANNEL_CASES])
def test_emulated_index_types_channelwise(emu_bits, case):
    """32- and 64-bit index kernels give the same bits; both match the oracle (several inner values)."""
    n, n_alpha, inner = case
    rng = np.random.default_rng(n)
    v = rng.standard_normal(n).astype(np.float32)
    alpha = (rng.random(n_alpha) + 0.1).astype(np.float32)
    sigma = np.array(0.6, dtype=np.float32)
    results = {}
    for bits in (32, 64):
        emu_bits.emu_set_index_bits(bits)
        (out,) = _run(emu_bits, "emu_perturb", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [v])
        (grad,) = _run(emu_bits, "emu_alpha_grad", [v], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
        results[bits] = (out, grad)
    np.testing.assert_array_equal(results[32][0], results[64][0])
    np.testing.assert_array_equal(results[32][1], results[64][1])
    out, grad = results[32]
    np.testing.assert_allclose(out, _expected("out", v, alpha, sigma, inner), rtol=0, atol=2e-6)
    expected = _expected("grad", v, alpha, sigma, inner)
    scale = 1.0 + np.abs(expected).max()
    np.testing.assert_allclose(grad / scale, expected / scale, rtol=0, atol=2e-5)


def test_emulated_index_types_list_and_unaligned(emu_bits):
    """The list kernel (mixed layerwise / channelwise / elementwise) and the unaligned tail, both index types."""
    rng = np.random.default_rng(8)
    specs = [(16 * 27, 16, 27), (1001, 1, 1), (6 * 49 * 2, 6, 49), (77, 77, 1), (5 * 70, 5, 70)]
    ins, alphas, sigmas, offsets, inners = [], [], [], [], []
    offset = 3
    for i, (n, n_alpha, inner) in enumerate(specs):
        base = rng.standard_normal(n + 1).astype(np.float32)
        ins.append(base[1:] if i % 2 else base[:n])  # odd tensors start one element in: scalar path
        alphas.append((rng.random(n_alpha) + 0.1).astype(np.float32))
        sigmas.append(np.array(0.3 + i / 10, dtype=np.float32))
        offsets.append(offset)
        inners.append(inner)
        offset += (n + 3) // 4
    results = {}
    for bits in (32, 64):
        emu_bits.emu_set_index_bits(bits)
        results[bits] = _run(emu_bits, "emu_perturb", ins, alphas, sigmas, offsets, inners, SEED, ins)
    for i in range(len(specs)):
        np.testing.assert_array_equal(results[32][i], results[64][i])
        np.testing.assert_allclose(
            results[32][i],
            _expected("out", ins[i], alphas[i], sigmas[i], inners[i], SEED, offsets[i]),
            rtol=0,
            atol=2e-6,
        )


# Stage 2 with a block per alpha index: a layerwise alpha of a tensor with >= 1024 * 2048 elements
# (warp mode, over 1024 partials), and short segments with many rows (thread mode) over 5 blocks.
STAGE2_CASES = {
    "layerwise-block": (1024 * 2048 + 4 * 999 + 3, 1, 1),
    "thread-mode-5-blocks": (1100 * 5 * 4, 5, 4),
}


@pytest.mark.parametrize("case", list(STAGE2_CASES))
def test_emulated_stage2_block_reduction(emu, case):
    """Stage 2 by a whole block: planned as such, deterministic, within the rounding bound of the exact sum."""
    n, n_alpha, inner = STAGE2_CASES[case]
    assert emu.emu_stage2_block(n, n_alpha, inner) == 1
    assert emu.emu_stage2_block(4096, 1, 1) == 0  # few partials: a warp per index
    rng = np.random.default_rng(9)
    g = rng.standard_normal(n).astype(np.float32)
    alpha = (rng.random(n_alpha) + 0.1).astype(np.float32)
    sigma = np.array(0.75, dtype=np.float32)
    (grad,) = _run(emu, "emu_alpha_grad", [g], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
    (again,) = _run(emu, "emu_alpha_grad", [g], [alpha], [sigma], [OFFSET], [inner], SEED, [alpha])
    np.testing.assert_array_equal(grad, again)  # deterministic
    # the emulation's own z: perturb of zeros with alpha * sigma = 1 (exact in float32)
    zeros = np.zeros(n, dtype=np.float32)
    (z,) = _run(
        emu, "emu_perturb", [zeros], [np.ones(1, np.float32)], [np.array(1.0, np.float32)], [OFFSET], [1], SEED, [zeros]
    )
    np.testing.assert_allclose(z, oracle.normal(SEED, OFFSET, n), rtol=0, atol=2e-6)
    k = (np.arange(n) // inner) % n_alpha
    gz = g.astype(np.float64) * z.astype(np.float64)
    exact = np.bincount(k, weights=gz, minlength=n_alpha) * 0.75
    cond = np.bincount(k, weights=np.abs(gz), minlength=n_alpha) * 0.75
    # rounding bound of the two-stage float32 sum: (longest chain of additions) * eps * sum |g z|
    chain = kChunk // 4 // 32 * 4 + 5 + -(-n // kChunk // 256) + 5 + 8 + 2
    np.testing.assert_array_less(np.abs(grad - exact), chain * np.finfo(np.float32).eps * cond + 1e-30)
    # float64: same z, same order; bound n * eps64 * sum |g z|
    g64 = g.astype(np.float64)
    (grad64,) = _run(
        emu,
        "emu_alpha_grad",
        [g64],
        [alpha.astype(np.float64)],
        [np.array(0.75)],
        [OFFSET],
        [inner],
        SEED,
        [alpha.astype(np.float64)],
    )
    # the float64 kernels compute z in float32 too (design.md section 3): the same z
    np.testing.assert_array_less(np.abs(grad64 - exact), n * np.finfo(np.float64).eps * cond + 1e-300)
