"""sigma_multi (all of a model's sigmas in one op call) and the CUDA sigma kernels.

* CPU: ``sigma_multi(vs)[t]`` is bit-for-bit ``sigma(vs[t])`` (one definition, csrc/cpu/sigma_cpu.cpp),
  and both equal the definition computed independently here (float64 two-pass, rounded once to
  float32; float64: the power-of-two scaled two-pass), for 0/1/2 elements, NaN/Inf, values whose
  squares overflow, views, and any thread count.
* CUDA (csrc/cuda/sigma_cuda.cu): another, fixed summation order. ``emulate_cuda`` below replays
  that order in numpy float64 (every operation is IEEE round-to-nearest on both sides, the kernel
  uses no FMA contraction), so on a GPU the kernel must match it bit for bit; on any machine the
  emulated order must agree with the CPU op (equal float32 results except at a float32 rounding
  midpoint within the summation error; float64 within that error).
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest
import torch

from pni_fast import _ext

ops = torch.ops.pni_fast
ON_GPU = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(
    not (_ext.load() and _ext.has_op("sigma", "cpu")), reason="the compiled pni_fast library is not available"
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FINITE_TOP = {torch.float32: 1e30, torch.float64: 1e200, torch.float16: 1e3, torch.bfloat16: 1e30}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def reference(x: torch.Tensor) -> float:
    """The definition of sigma as a float64 number (before the rounding to float32), from torch ops."""
    d = x.detach().cpu().double().reshape(-1)
    n = d.numel()
    if n < 2:
        return 0.0
    if torch.isinf(d).any():  # an infinity: NaN (a NaN propagates through the sums)
        return math.nan
    k = 0
    if x.dtype == torch.float64:
        amax = d.nan_to_num(0.0).abs().max().item()
        if amax > 0:
            k = min(1022, max(-1022, math.frexp(amax)[1] - 1))
    y = d * 2.0**-k if k else d
    return math.ldexp((((y - y.mean()) ** 2).sum() / (n - 1)).sqrt().item(), k)


def _rounded(value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _random_list(gen: torch.Generator, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """Sizes 0/1/2, item boundaries (16 Ki) and CUDA chunk boundaries (4 Ki, 16 chunks); offsets,
    huge and tiny values; NaN/Inf; views (transposed, strided, offset)."""
    sizes = [0, 1, 2, 3, 4095, 4096, 4097, 16383, 16384, 16385, 65536, 65537, 70001]
    out = []
    for i in range(count):
        n = sizes[i] if i < len(sizes) else int(torch.randint(2, 40000, (1,), generator=gen))
        top = math.log10(FINITE_TOP[dtype])
        scale = 10.0 ** float(torch.empty(1).uniform_(-top / 2, top, generator=gen))
        shift = scale * float(torch.randn(1, generator=gen)) * 10.0 ** float(torch.randint(-3, 3, (1,), generator=gen))
        x = (
            (torch.randn(n, dtype=torch.float64, generator=gen) * scale + shift)
            .clamp(-FINITE_TOP[dtype], FINITE_TOP[dtype])
            .to(dtype)
        )
        kind = i % 7
        if kind == 1 and n >= 2:
            x[int(torch.randint(n, (1,), generator=gen))] = math.nan
        elif kind == 2 and n >= 2:
            x[-1] = -math.inf
        elif kind == 3 and n >= 6:
            x = x[: n // 6 * 6].reshape(-1, 6).t()  # transposed view
        elif kind == 4 and n >= 4:
            x = x[1::2]  # strided view with an offset
        out.append(x)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_equals_single_and_definition(dtype):
    vs = _random_list(torch.Generator().manual_seed(DTYPES.index(dtype)), dtype, 40)
    got = ops.sigma_multi(vs)
    assert got.shape == (len(vs),) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    single = torch.stack([ops.sigma(v) for v in vs])
    assert torch.equal(_bits(got), _bits(single))
    for v, s in zip(vs, got):
        ref = reference(v)
        if math.isnan(ref):
            assert math.isnan(s.item())
        elif dtype == torch.float64:  # same definition, torch's summation order
            assert abs(s.item() - ref) <= 1e-14 * ref, (v.numel(), s.item(), ref)
        else:
            assert s.item() == _rounded(ref, dtype).item(), (v.numel(), s.item(), ref)
    assert sum(math.isnan(s) for s in got.tolist()) >= 8  # the NaN/Inf cases were exercised


def test_huge_values_do_not_overflow():
    gen = torch.Generator().manual_seed(11)
    x32 = (torch.randn(5000, dtype=torch.float64, generator=gen) * 1e30).float()
    x64 = torch.randn(4999, dtype=torch.float64, generator=gen) * 1e200 + 3e200
    tiny = torch.randn(777, dtype=torch.float64, generator=gen) * 1e-200
    assert torch.isinf((x32 - x32.mean()).pow(2).sum())  # the float32 trap
    assert not math.isfinite(x64.std().item())  # the float64 trap
    (s32,) = ops.sigma_multi([x32]).tolist()
    assert s32 == _rounded(reference(x32), torch.float32).item()
    s64 = ops.sigma_multi([x64, tiny])
    for got, x in zip(s64.tolist(), (x64, tiny)):
        assert math.isfinite(got) and abs(got - reference(x)) <= 1e-14 * reference(x)


def test_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(12)
    vs = [torch.randn(n, generator=gen) * 3 + 1 for n in (300_000, 16_385, 5, 70_001, 1_000_000)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append((ops.sigma_multi(vs), torch.stack([ops.sigma(v) for v in vs])))
    finally:
        torch.set_num_threads(before)
    for multi, single in results:
        assert torch.equal(_bits(multi), _bits(results[0][0])) and torch.equal(_bits(single), _bits(multi))


def test_errors_name_the_argument():
    with pytest.raises(RuntimeError, match=r"all of vs must share one dtype, got vs\[0\] Float and vs\[1\] Double"):
        ops.sigma_multi([torch.ones(3), torch.ones(3, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match=r"vs\[1\] must be float32, float64, float16 or bfloat16, got Long"):
        ops.sigma_multi([torch.ones(3), torch.ones(3, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match=r"vs\[0\] must be float32"):
        ops.sigma_multi([torch.ones(3, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match="no tensor arguments"):  # the dispatcher needs a device
        ops.sigma_multi([])


def test_meta_fake_and_opcheck():
    m = ops.sigma_multi([torch.empty(5, 7, device="meta"), torch.empty(0, device="meta")])
    assert m.shape == (2,) and m.dtype == torch.float32 and m.device.type == "meta"
    assert ops.sigma_multi([torch.empty(3, dtype=torch.float64, device="meta")]).dtype == torch.float64
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.sigma_multi([torch.empty(3, device="meta"), torch.empty(3, dtype=torch.float16, device="meta")])
    gen = torch.Generator().manual_seed(13)
    for dtype in DTYPES:
        vs = [torch.randn(n, generator=gen).to(dtype) for n in (1, 2, 300, 20_000)] + [torch.randn(8, 6).to(dtype).t()]
        torch.library.opcheck(ops.sigma_multi.default, (vs,))
    compiled = torch.compile(lambda xs: ops.sigma_multi(xs) * 2, fullgraph=True, backend="eager")
    vs = [torch.randn(40, generator=gen), torch.randn(3, 3, generator=gen)]
    assert torch.equal(compiled(vs), ops.sigma_multi(vs) * 2)


# ---------------------------------------------------------------------------
# The CUDA kernels' summation order, emulated in numpy (see csrc/cuda/sigma_cuda.cu)
# ---------------------------------------------------------------------------

THREADS, VEC, ITERS = 256, 4, 4
CHUNK = THREADS * VEC * ITERS


def _butterfly(v: np.ndarray, width: int, comb) -> np.ndarray:
    """Xor butterfly over the last axis (v = v + shfl_xor(v, o), o = width/2 .. 1); lane 0's value."""
    idx = np.arange(width)
    o = width // 2
    while o:
        v = comb(v, v[..., idx ^ o])
        o //= 2
    return v[..., 0]


def _block_reduce(per_thread: np.ndarray, comb) -> np.ndarray:
    """[..., 256] -> [...]: warp butterflies, then warp 0 over the 8 warp values."""
    warps = _butterfly(per_thread.reshape(*per_thread.shape[:-1], THREADS // 32, 32), 32, comb)
    return _butterfly(warps, THREADS // 32, comb)


def _emulated_pass(y: np.ndarray, comb) -> float:
    """One pass over per-element terms y (already f(x)): chunk partials, then their combination."""
    n = y.size
    nch = -(-n // CHUNK)
    padded = np.zeros(nch * CHUNK)
    padded[:n] = y  # absent elements are skipped by the kernel; adding +0.0 to acc (never -0.0) is the same
    terms = padded.reshape(nch, ITERS, THREADS, VEC)
    acc = np.zeros((nch, THREADS))
    for r in range(ITERS):
        for e in range(VEC):
            acc = comb(acc, terms[:, r, :, e])
    part = _block_reduce(acc, comb)  # [nch]
    rows = np.zeros(-(-nch // THREADS) * THREADS)
    rows[:nch] = part
    acc = np.zeros(THREADS)
    for row in rows.reshape(-1, THREADS):
        acc = comb(acc, row)
    return float(_block_reduce(acc, comb))


def emulate_cuda(x: torch.Tensor) -> float:
    """The CUDA kernels' float64 value (before the rounding to float32), operation by operation."""
    d = x.detach().cpu().double().reshape(-1).numpy()  # exact widening of every dtype
    n = d.size
    if n < 2:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        scale, k, inf = 1.0, 0, False
        if x.dtype == torch.float64:
            amax = _emulated_pass(np.abs(d), np.fmax)  # fmax ignores NaN
            inf = math.isinf(amax)
            if not inf and amax > 0:
                k = min(1022, max(-1022, math.frexp(amax)[1] - 1))
                scale = math.ldexp(1.0, -k)
        y = d * scale
        mean = _emulated_pass(y, np.add) / n
        dev = y - mean
        ss = _emulated_pass(dev * dev, np.add)
        sd = math.sqrt(ss / (n - 1)) if ss == ss and ss >= 0 else math.nan
    return math.nan if inf else math.ldexp(sd, k)


def _assert_agrees_with_cpu(x: torch.Tensor, emulated: float, cpu: float):
    """Different summation orders: float64 within the summation error; float32 results equal unless a
    float32 rounding midpoint lies within that error of the emulated value."""
    if math.isnan(cpu):
        assert math.isnan(emulated)
        return
    ref = reference(x)
    err = 4 * x.numel() * 2.0**-53 * ref + 1e-300  # both orders are within n*eps*ref of the exact value
    assert abs(emulated - ref) <= err, (x.numel(), emulated, ref)
    if x.dtype == torch.float64:
        assert abs(emulated - cpu) <= 2 * err
        return
    got = _rounded(emulated, torch.float32).item()
    if got != cpu:
        lo, hi = sorted((got, cpu))
        mid = (lo + hi) / 2  # float32 values are exact in float64, so is their midpoint
        assert np.nextafter(np.float32(lo), np.float32(np.inf)) == np.float32(hi) and abs(mid - emulated) <= err, (
            x.numel(),
            emulated,
            got,
            cpu,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_cuda_order_agrees_with_cpu(dtype):
    vs = _random_list(torch.Generator().manual_seed(20 + DTYPES.index(dtype)), dtype, 30)
    cpu = ops.sigma_multi(vs).tolist()
    ties = 0
    for v, c in zip(vs, cpu):
        e = emulate_cuda(v)
        _assert_agrees_with_cpu(v, e, c)
        ties += dtype != torch.float64 and not math.isnan(c) and _rounded(e, dtype).item() != c
    assert ties <= 1  # a float32 midpoint within the summation error is rare


def test_emulation_detects_a_wrong_order():
    """The emulated order is not a plain sequential sum: on these values the float64 bits differ, so
    the GPU test (bitwise against the emulation) would catch a kernel that sums in another order."""
    y = (torch.randn(70_001, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1e3 + 1e7).numpy()
    assert _emulated_pass(y, np.add) != float(np.cumsum(y)[-1])
    assert abs(_emulated_pass(y, np.add) - math.fsum(y)) <= 70_001 * 2.0**-52 * math.fsum(y)


# ---------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------

requires_cuda_sigma = pytest.mark.skipif(
    not (
        ON_GPU and _ext.has_cuda() and torch._C._dispatch_has_kernel_for_dispatch_key("pni_fast::sigma_multi", "CUDA")
    ),
    reason="needs a CUDA device and the CUDA build of pni_fast (csrc/cuda/sigma_cuda.cu)",
)


@requires_cuda_sigma
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_emulation_bitwise_and_cpu(dtype):
    vs = _random_list(torch.Generator().manual_seed(30 + DTYPES.index(dtype)), dtype, 30)
    vs.append(torch.randn(3_000_001, dtype=torch.float64).to(dtype) * 5 + 2)  # many chunks: finalize kernels
    dev = [v.cuda() for v in vs]
    got = ops.sigma_multi(dev).cpu()
    single = torch.stack([ops.sigma(v) for v in dev]).cpu()
    assert torch.equal(_bits(got), _bits(single))
    cpu = ops.sigma_multi(vs).tolist()
    for v, g, c in zip(vs, got.tolist(), cpu):
        e = emulate_cuda(v)
        if math.isnan(e):
            assert math.isnan(g)
            continue
        assert g == _rounded(e, dtype).item(), (v.numel(), g, e)
        _assert_agrees_with_cpu(v, e, c)


@requires_cuda_sigma
def test_cuda_no_sync_graphs_and_no_float32_copy():
    gen = torch.Generator().manual_seed(40)
    vs = [torch.randn(n, generator=gen).cuda() for n in (432, 2304, 4608, 9216, 36864, 200_000)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.sigma_multi(vs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    static = torch.zeros_like(out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static.copy_(ops.sigma_multi(vs))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, out)
    for v in vs:
        v.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, ops.sigma_multi(vs))
    big = torch.randn(64 * 2**20, device="cuda").half()  # 128 MiB; a float32 copy would be 256 MiB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.sigma(big)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**20


# ---------------------------------------------------------------------------
# Timing (informational; printed with -s)
# ---------------------------------------------------------------------------


def test_resnet20_one_call_not_slower_than_twenty(capsys):
    """ResNet-20's 20 weight tensors (19 convs + fc): one sigma_multi vs 20 sigma calls, 1 thread."""
    shapes = (
        [(16, 3, 3, 3)]
        + [(16, 16, 3, 3)] * 6
        + [(32, 16, 3, 3)]
        + [(32, 32, 3, 3)] * 5
        + [(64, 32, 3, 3)]
        + [(64, 64, 3, 3)] * 5
        + [(10, 64)]
    )
    ws = [torch.randn(s) * 0.1 for s in shapes]
    assert len(ws) == 20
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def times_us(fn):
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                for _ in range(10):
                    fn()
                times.append((time.perf_counter() - t0) / 10 * 1e6)
            return times

        multi = times_us(lambda: ops.sigma_multi(ws))
        single = times_us(lambda: [ops.sigma(w) for w in ws])
    finally:
        torch.set_num_threads(before)
    with capsys.disabled():
        print(
            f"\nResNet-20 sigmas, 1 thread, median: sigma_multi {statistics.median(multi):.1f} us, "
            f"20 x sigma {statistics.median(single):.1f} us"
        )
    assert min(multi) < 1.5 * min(single)  # loose, and on the fastest round: a shared machine is noisy
