"""GPU tests: the CUDA C++ kernels and the Triton kernels on a real device.

Skipped with "no CUDA device" on machines without a GPU (the Triton kernels are then covered
by tests/test_triton.py under the interpreter and the CUDA sources by tests/test_cuda_compile.py).
``scripts/gpu_check.sh`` runs this file on a GPU.

Tolerances follow the contract (design.md section 3, docs/ops.md), never a measured value:
every backend's z is within ``Z_TOL = 2e-6`` of the numpy oracle, its words and uniforms are
bit-exact, and the arithmetic on z is that of the value's dtype. So each output is checked
twice, with element-wise bounds a correct kernel cannot exceed (``out_bound``/``grad_bound``):
against float64 math on the oracle's z (allowing ``|alpha * sigma| * Z_TOL`` for the noise and the
rounding of the dtype), and against float64 math on the backend's own z (``noise`` op, same seed
and offset), where only rounding remains. Alpha gradients are bounded relative to
``sigma * sum |g z|`` (the condition of the sum), which a reduction of any order meets while a
wrong, missing or shifted noise value does not. Bitwise equality is asserted only where the
same kernel sees the same values (reruns, list vs single op on the CUDA backend, views copied
to contiguous, CUDA-graph replays vs eager calls from the same RNG state).

Tests marked ``runs_on_cpu`` check the helpers themselves on the CPU backend. Setting
``PNI_GPU_TESTS_ON_CPU=1`` on a machine without a GPU runs the kernel tests' logic on CPU
tensors (C++ CPU kernels for "cuda", the Triton interpreter for "triton"), a dry run of this
file; what needs a real device (graphs, streams, big memory) still skips.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import philox_oracle as oracle
from tolerances import SIGMA_REL, UNIT, Z_TOL, Bounds, assert_within, expected_out, grad_terms
from tolerances import alpha_index as _index
from tolerances import flat64 as _flat64

import pni_fast
from pni_fast import _ext
from pni_fast.reference import reference_noisy_weight

pytestmark = [pytest.mark.cuda]

ON_GPU = torch.cuda.is_available()
DRY_RUN = not ON_GPU and os.environ.get("PNI_GPU_TESTS_ON_CPU") == "1"
DEV = "cuda" if ON_GPU else "cpu"
ops = torch.ops.pni_fast
SEED = 0x0DDB_A11_5EED  # > 2^32
OFFSET = 2**32 - 100  # counters cross the 32-bit boundary of c0/c1

_BOUNDS = Bounds(bf16_truncates=DRY_RUN)  # the Triton interpreter converts to bf16 by truncation
out_bound, grad_bound, check_perturb, check_grad = (
    _BOUNDS.out_bound, _BOUNDS.grad_bound, _BOUNDS.check_perturb, _BOUNDS.check_grad)


def runs_on_cpu(fn):
    """Mark a test that needs no GPU (it checks this file's helpers on the CPU backend)."""
    fn.runs_on_cpu = True
    return fn


@pytest.fixture(autouse=True)
def _needs_device(request):
    if not (ON_GPU or DRY_RUN or getattr(request.function, "runs_on_cpu", False)):
        pytest.skip("no CUDA device")


def _has_cuda_ext() -> bool:
    if ON_GPU:
        return _ext.load() and _ext.has_cuda()
    return DRY_RUN and _ext.load()  # dry run: the C++ CPU kernels stand in


def _has_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"


needs_cuda_ext = pytest.mark.skipif(
    (ON_GPU or DRY_RUN) and not _has_cuda_ext(),
    reason="pni_fast was built without CUDA kernels" if ON_GPU else "the C++ extension is not loaded",
)
needs_triton = pytest.mark.skipif((ON_GPU or DRY_RUN) and not _has_triton(), reason="triton is not installed")
real_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a real CUDA device (streams, graphs or device memory)")
needs_rng_state = pytest.mark.skipif(not hasattr(pni_fast, "make_rng_state"),
                                     reason="pni_fast.make_rng_state is missing (op contract v2 not implemented)")

GPU_BACKENDS = [
    pytest.param("cuda", marks=needs_cuda_ext),
    pytest.param("triton", marks=needs_triton),
]
OPS = {  # backend -> (noise, perturb, alpha grad, multi, alpha grad multi)
    "cuda": ("noise", "perturb", "perturb_alpha_grad", "perturb_multi", "perturb_alpha_grad_multi"),
    "triton": ("noise_triton", "perturb_triton", "perturb_alpha_grad_triton", "perturb_multi_triton",
               "perturb_alpha_grad_multi_triton"),
}

# (shape, alpha numel, inner): every alpha mode and every stage-1 path of the CUDA kernel
# (thread mode for inner < 64, warp mode with one and several chunks, direct elementwise).
CASES = {
    "layerwise-small": ((7,), 1, 1),
    "layerwise-large": ((100_003,), 1, 1),
    "conv-channelwise": ((16, 8, 3, 3), 16, 72),
    "linear-channelwise-long": ((3, 5000), 3, 5000),
    "aligned-rows": ((2, 2048), 2, 2048),
    "elementwise": ((33, 7), 231, 1),
    "act-channelwise-7x7": ((4, 6, 7, 7), 6, 49),
    "act-channelwise-4x4": ((3, 4, 4, 4), 4, 16),
    "act-channelwise-32x32": ((2, 3, 32, 32), 3, 1024),
    "act-per-feature": ((9, 13), 13, 1),
}
# value dtype, alpha dtype (docs/ops.md: alpha has v's dtype, or float32 with half tensors)
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16-alpha32": (torch.float16, torch.float32),
    "bfloat16-alpha32": (torch.bfloat16, torch.float32),
}


def _ops(backend: str):
    if backend == "triton":
        import pni_fast.triton  # noqa: F401  (registers the *_triton ops)
    return [getattr(ops, name) for name in OPS[backend]]


def _api(backend: str) -> str:
    """The ``backend=`` name for the public API (dry run: the CPU kernels stand in for CUDA)."""
    return "cpu" if backend == "cuda" and not ON_GPU else backend


# ---------------------------------------------------------------------------
# Expected values and the bounds a correct kernel stays within (float64, on the CPU)
# ---------------------------------------------------------------------------


def _z64(numel, seed=SEED, offset=OFFSET) -> torch.Tensor:
    return torch.from_numpy(oracle.normal(seed, offset, numel)).double()


def _oracle_z_at(seed: int, offset: int, idx) -> torch.Tensor:
    """The oracle's z of the elements ``idx`` of a tensor (for tensors too big for the full oracle)."""
    idx = np.asarray(idx, dtype=np.int64)
    words = oracle.philox4x32_10(np.uint64(offset) + (idx // 4).astype(np.uint64), seed)
    z = oracle.normal_from_words(words.reshape(-1)).reshape(-1, 4)
    return torch.from_numpy(z[np.arange(idx.size), idx % 4].astype(np.float64))


def _inputs(shape, n_alpha, dtype, alpha_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen).to(dtype).to(DEV)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEV)
    alpha = (torch.rand(n_alpha, generator=gen) + 0.1).to(alpha_dtype or dtype).to(DEV)
    return v, g, alpha, torch.tensor(0.75, device=DEV)


# ---------------------------------------------------------------------------
# The helpers can fail (CPU backend; no GPU needed)
# ---------------------------------------------------------------------------


@runs_on_cpu
def test_oracle_z_at_matches_full_oracle():
    idx = np.array([0, 1, 2, 3, 4, 7, 998, 999, 1001])
    full = _z64(1002, 77, 2**32 - 1)
    assert torch.equal(_oracle_z_at(77, 2**32 - 1, idx), full[idx])


@runs_on_cpu
def test_bounds_accept_cpu_kernels_and_reject_defects():
    """The CPU backend obeys the same contract: it passes, and shifted or perturbed results fail."""
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(5))
    alpha = torch.full((16, 1, 1, 1), 0.3, requires_grad=True)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    out = pni_fast.noisy_weight(w, alpha, seed=SEED, offset=OFFSET)
    out.backward(g)
    sigma = pni_fast.weight_sigma(w)
    z = _z64(w.numel())
    check_perturb(out, w, alpha, sigma, 72, z)
    check_grad(alpha.grad, g, alpha, sigma, 72, z)
    for wrong_z in (_z64(w.numel(), SEED, OFFSET + 1), _z64(w.numel(), SEED + 1, OFFSET)):
        with pytest.raises(AssertionError, match="out of bounds"):
            check_perturb(out, w, alpha, sigma, 72, wrong_z)
        with pytest.raises(AssertionError, match="out of bounds"):
            check_grad(alpha.grad, g, alpha, sigma, 72, wrong_z)
    bumped = out.detach().clone()
    bumped.view(-1)[100] += 2e-5 * 0.3 * float(sigma)  # beyond |alpha sigma| * Z_TOL + rounding
    with pytest.raises(AssertionError, match="1 of 1152 elements"):
        check_perturb(bumped, w, alpha, sigma, 72, z)
    lost = alpha.grad.clone()
    lost[3] -= float(sigma) * 0.02 * abs(float(g.reshape(16, -1)[3, 0]) * float(z.reshape(16, -1)[3, 0]))
    with pytest.raises(AssertionError, match="1 of 16 elements"):
        check_grad(lost, g, alpha, sigma, 72, z)
    with pytest.raises(AssertionError, match="out of bounds"):
        assert_within(torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.float64),
                      torch.ones(1, dtype=torch.float64), "nan")


# ---------------------------------------------------------------------------
# RNG agreement across backends
# ---------------------------------------------------------------------------


def test_noise_agrees_across_backends():
    """CUDA, Triton, CPU and pure-PyTorch z for one (seed, offset) vs the oracle, within 2e-6."""
    n = 10_007
    expected = oracle.normal(SEED, OFFSET, n)
    got = {"torch-cpu": pni_fast.randn((n,), seed=SEED, offset=OFFSET, device="cpu", backend="torch"),
           "torch-dev": pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend="torch")}
    if _ext.load():
        got["cpu"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device="cpu", backend="cpu")
    if _has_cuda_ext():
        got["cuda"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend=_api("cuda"))
    if _has_triton():
        got["triton"] = pni_fast.randn((n,), seed=SEED, offset=OFFSET, device=DEV, backend="triton")
    for name, z in got.items():
        assert z.dtype == torch.float32 and z.shape == (n,), name
        err = np.abs(z.cpu().numpy().astype(np.float64) - expected).max()
        assert err <= Z_TOL, f"{name}: max |z - oracle| = {err:.3g}"


@needs_cuda_ext
@pytest.mark.parametrize("numel", [1, 5, 4096, 10_001])
def test_cuda_words_and_uniforms_bit_exact(numel):
    like = torch.empty(numel, device=DEV)
    words = ops.rng_words(like, SEED, OFFSET).cpu().numpy().view(np.uint32)
    np.testing.assert_array_equal(words, oracle.words(SEED, OFFSET, numel))
    uni = ops.rng_uniform(like, SEED, OFFSET).cpu().numpy()
    np.testing.assert_array_equal(uni, oracle.uniform(oracle.words(SEED, OFFSET, numel)))


@needs_cuda_ext
def test_cuda_noise_large_tensor():
    n = (1 << 22) + 3
    z = ops.noise(torch.empty(n, device=DEV), 11, 5).cpu().numpy()
    idx = np.r_[0:1000, n - 1000:n]
    assert np.abs(z[idx] - oracle.normal(11, 5, n)[idx]).max() <= Z_TOL
    # 4M samples: the standard errors of mean and variance are 5e-4 and 7e-4
    assert abs(z.mean()) < 3e-3 and abs(z.var() - 1) < 4e-3


# ---------------------------------------------------------------------------
# perturb / alpha grad vs float64 math
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_perturb_and_alpha_grad(backend, dtype, case):
    noise, perturb, alpha_grad, _, _ = _ops(backend)
    shape, n_alpha, inner = CASES[case]
    v, g, alpha, sigma = _inputs(shape, n_alpha, *DTYPES[dtype])
    out = perturb(v, alpha, sigma, SEED, OFFSET, inner)
    assert out.shape == v.shape and out.dtype == v.dtype and out.device == v.device
    z_oracle = _z64(v.numel())
    z_own = _flat64(noise(v, SEED, OFFSET))
    assert (z_own - z_oracle).abs().max() <= Z_TOL
    check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own)
    grad = alpha_grad(g, alpha, sigma, SEED, OFFSET, inner)
    assert grad.shape == alpha.shape and grad.dtype == alpha.dtype  # accumulated in fp32/fp64 inside
    check_grad(grad, g, alpha, sigma, inner, z_oracle, z_own)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sigma_in_value_dtype_and_empty(backend):
    _, perturb, alpha_grad, _, _ = _ops(backend)
    v, _, alpha, _ = _inputs((5, 40), 5, torch.float16)
    sigma = torch.tensor(0.5, dtype=torch.float16, device=DEV)
    out = perturb(v, alpha, sigma, 1, 2, 40)
    check_perturb(out, v, alpha, sigma, 40, _z64(200, 1, 2))
    empty = torch.empty(0, 3, device=DEV)
    one = torch.ones(1, device=DEV)
    s = torch.tensor(1.0, device=DEV)
    assert perturb(empty, one, s, 1, 0, 1).shape == (0, 3)
    assert alpha_grad(empty, one, s, 1, 0, 1).item() == 0.0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_alpha_grad_deterministic(backend):
    _, _, alpha_grad, _, _ = _ops(backend)
    for shape, n_alpha, inner in [((1 << 20,), 1, 1), ((64, 32, 3, 3), 64, 288), ((8, 16, 14, 14), 16, 196)]:
        _, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32)
        first = alpha_grad(g, alpha, sigma, 3, 0, inner)
        for _ in range(3):
            assert torch.equal(alpha_grad(g, alpha, sigma, 3, 0, inner), first)


@needs_cuda_ext
@needs_triton
def test_cuda_matches_triton():
    """Both backends within the contract of each other (each z within Z_TOL of the oracle)."""
    shape, n_alpha, inner = CASES["conv-channelwise"]
    v, g, alpha, sigma = _inputs(shape, n_alpha, torch.float32)
    cu, tr = _ops("cuda"), _ops("triton")
    out_cu, out_tr = cu[1](v, alpha, sigma, 4, 9, inner), tr[1](v, alpha, sigma, 4, 9, inner)
    z_tr = _flat64(tr[0](v, 4, 9))
    exp, a = expected_out(v, alpha, sigma, inner, z_tr)
    assert_within(out_cu, exp, out_bound(_flat64(v), a, float(sigma), z_tr, v.dtype, 2 * Z_TOL), "cuda vs triton z")
    assert_within(out_tr, exp, out_bound(_flat64(v), a, float(sigma), z_tr, v.dtype, 0.0), "triton vs own z")
    exp, abs_gz, abs_g = grad_terms(g, alpha, sigma, inner, z_tr)
    bound = grad_bound(exp, abs_gz, abs_g, g.dtype, alpha.dtype, 2 * Z_TOL)
    assert_within(cu[2](g, alpha, sigma, 4, 9, inner), exp, bound, "cuda alpha grad vs triton z")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_unaligned_views(backend, dtype):
    """Views starting at storage_offset % 4 != 0 (no vector loads): same results as aligned copies."""
    noise, perturb, alpha_grad, multi, _ = _ops(backend)
    vdtype = DTYPES[dtype][0]
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(4 * 4099 + 8, generator=gen).to(vdtype).to(DEV)
    gbase = torch.randn(4 * 4099 + 8, generator=gen).to(vdtype).to(DEV)
    abase = (torch.rand(64, generator=gen) + 0.1).to(vdtype).to(DEV)
    sigma = torch.tensor(0.75, device=DEV)
    for off in (1, 2, 3):
        for shape, n_alpha, inner in [((4099,), 1, 1), ((17, 241), 17, 241), ((4, 1024), 4, 1024)]:
            n = math.prod(shape)
            v = base[off:off + n].view(shape)
            g = gbase[off + 4:off + 4 + n].view(shape)
            alpha = abase[off:off + n_alpha]
            assert v.storage_offset() % 4 != 0 and v.is_contiguous()
            out = perturb(v, alpha, sigma, SEED, OFFSET, inner)
            assert torch.equal(out, perturb(v.clone(), alpha.clone(), sigma, SEED, OFFSET, inner)), (off, shape)
            check_perturb(out, v, alpha, sigma, inner, _z64(n), what=f"out, offset {off}, {shape}")
            (out_multi,) = multi([v], [alpha], [sigma], SEED, [OFFSET], [inner])
            assert torch.equal(out_multi, out), (off, shape)
            grad = alpha_grad(g, alpha, sigma, SEED, OFFSET, inner)
            aligned = alpha_grad(g.clone(), alpha.clone(), sigma, SEED, OFFSET, inner)
            if backend == "cuda":  # loads change, the summation order does not
                assert torch.equal(grad, aligned), (off, shape)
            z_own = _flat64(noise(v, SEED, OFFSET))
            check_grad(grad, g, alpha, sigma, inner, _z64(n), z_own, what=f"alpha grad, offset {off}, {shape}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_contiguous_and_channels_last(backend):
    """Elements are taken in logical (contiguous) order whatever the memory layout."""
    b = _api(backend)
    gen = torch.Generator().manual_seed(4)
    cases = [  # (function, tensor, alpha)
        (pni_fast.noisy_weight, torch.randn(16, 8, 3, 3, generator=gen).to(memory_format=torch.channels_last),
         torch.full((16, 1, 1, 1), 0.25)),
        (pni_fast.noisy_weight, torch.randn(40, 30, generator=gen).t(), torch.linspace(0.1, 0.4, 30).reshape(30, 1)),
        (pni_fast.inject_noise, torch.randn(4, 6, 7, 7, generator=gen).to(memory_format=torch.channels_last),
         torch.linspace(0.1, 0.6, 6)),
        (pni_fast.inject_noise, torch.randn(6, 9, generator=gen)[:, ::2], torch.full((1,), 0.3)),
    ]
    for fn, t, a in cases:
        t = t.to(DEV)  # .to keeps the strides (channels_last, transposed, sliced)
        assert not t.is_contiguous()
        g = torch.randn(t.shape, generator=gen).to(DEV)
        g = g.to(memory_format=torch.channels_last) if t.dim() == 4 else g.t().contiguous().t()
        grads = []
        for x, gx in ((t, g), (t.contiguous(), g.contiguous())):
            leaf = a.to(DEV).requires_grad_()
            out = fn(x, leaf, seed=SEED, offset=3, backend=b)
            assert out.shape == t.shape
            out.backward(gx)
            grads.append((out.detach().contiguous(), leaf.grad))
        assert torch.equal(grads[0][0], grads[1][0]), fn.__name__
        assert torch.equal(grads[0][1], grads[1][1]), fn.__name__


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: results there, equal to the same call on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs a second GPU (found {torch.cuda.device_count()})")
    w0 = torch.randn(64, 32, 3, 3, device="cuda:0")
    a0 = torch.full((64, 1, 1, 1), 0.25, device="cuda:0")
    g0 = torch.randn(w0.shape, device="cuda:0")
    results = []
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            a = a0.to(dev).requires_grad_()
            out = pni_fast.noisy_weight(w0.to(dev), a, seed=SEED, offset=5, backend=backend)
            out.backward(g0.to(dev))
            outs = pni_fast.noisy_weights([w0.to(dev), w0[:3].to(dev)], [a0.to(dev), a0[:1, 0, 0].to(dev)],
                                          seed=SEED, backend=backend)
            assert out.device == a.grad.device == outs[1].device == torch.device(dev)
            results.append([out.detach().cpu(), a.grad.cpu()] + [o.cpu() for o in outs])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def _check_big_tensor(noise, perturb, alpha_grad, n: int, chunk: int, device) -> None:
    """perturb and alpha grad of a bf16 tensor of n elements, checked at sampled elements (oracle z)
    and, for the gradient, against float64 sums of the backend's own z computed chunk by chunk."""
    v = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_(-2, 2)
    sigma = torch.tensor(0.5, device=device)
    mid = min(2**31, n // 2)  # around the int32 limit of a tensor beyond it
    rng = np.random.default_rng(0)
    idx = np.unique(np.r_[0:1024, mid - 1024:mid + 2, n - 1024:n, rng.integers(0, n, 1000)])
    idx_dev = torch.from_numpy(idx).to(device)
    z_at = _oracle_z_at(SEED, OFFSET, idx)
    assert chunk % 4 == 0  # each chunk's noise starts at counter OFFSET + start / 4
    for n_alpha, inner in [(1, 1), (2, n // 2)]:
        alpha = torch.tensor([0.3, 0.7][:n_alpha], dtype=torch.bfloat16, device=device)
        out = perturb(v, alpha, sigma, SEED, OFFSET, inner)
        a = _flat64(alpha)[torch.from_numpy((idx // inner) % n_alpha)]
        v_at = _flat64(v[idx_dev])
        bound = out_bound(v_at, a, 0.5, z_at, torch.bfloat16, Z_TOL)
        assert_within(out[idx_dev], v_at + a * 0.5 * z_at, bound, f"out at sampled elements, {n_alpha} alpha")
        del out
        grad = alpha_grad(v, alpha, sigma, SEED, OFFSET, inner)  # the gradient g = v
        exp = torch.zeros(n_alpha, dtype=torch.float64, device=device)
        abs_gz = torch.zeros_like(exp)
        for start in range(0, n, chunk):
            part = v[start:start + chunk]
            z = noise(part, SEED, OFFSET + start // 4)
            here = (idx >= start) & (idx < start + part.numel())
            if here.any():
                local = torch.from_numpy(idx[here] - start).to(device)
                assert (_flat64(z[local]) - z_at[torch.from_numpy(here)]).abs().max() <= Z_TOL, start
            gz = part.double() * z.double()
            k = (torch.arange(start, start + part.numel(), device=device) // inner) % n_alpha
            exp.index_add_(0, k, gz)
            abs_gz.index_add_(0, k, gz.abs())
            del z, gz, k
        exp, abs_gz = exp.cpu() * 0.5, abs_gz.cpu() * 0.5
        bound = grad_bound(exp, abs_gz, abs_gz, torch.bfloat16, torch.bfloat16, 0.0)
        assert_within(grad, exp, bound, f"alpha grad, {n_alpha} alpha")


@runs_on_cpu
def test_big_tensor_check_on_cpu_backend():
    """The check of test_more_than_2_31_elements, at 2^20 + 2 elements on the CPU backend."""
    backend = "" if _ext.load() else "_torch"
    names = (f"noise{backend}", f"perturb{backend}", f"perturb_alpha_grad{backend}")
    if backend:
        pni_fast.randn((1,), seed=0, device="cpu", backend="torch")  # registers the pure-PyTorch ops
    _check_big_tensor(*[getattr(ops, name) for name in names], n=2**20 + 2, chunk=2**17, device="cpu")


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    """A bf16 tensor of 2^31 + 2 elements: 64-bit indexing in the forward and the alpha gradient."""
    noise, perturb, alpha_grad, _, _ = _ops(backend)
    n = 2**31 + 2
    free, _ = torch.cuda.mem_get_info()
    need = 2 * 2 * n + 7 * 2**30  # v and out (bf16), the check's float64 chunks of 2^27
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    _check_big_tensor(noise, perturb, alpha_grad, n, chunk=2**27, device=DEV)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["layerwise", "channelwise"])
def test_fp16_alpha_grad_beyond_fp16_range(backend, mode):
    """8M fp16 elements, float32 alpha: the exact gradient exceeds 65504 and must stay finite and right."""
    if DRY_RUN and backend == "triton":
        pytest.skip("8M elements are too slow for the Triton interpreter")
    shape = (4, 2**21)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).half().to(DEV)
    z = pni_fast.randn(shape, seed=SEED, offset=0, device=DEV, backend=_api(backend))  # the backend's own z
    g = z.half()  # correlated with the noise: sum g z ~ numel, every partial sum positive
    alpha = torch.full((1,) if mode == "layerwise" else (4, 1), 0.25, device=DEV, requires_grad=True)
    out = pni_fast.noisy_weight(w, alpha, seed=SEED, offset=0, backend=_api(backend))
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    out.backward(g)
    grad = alpha.grad
    assert grad.dtype == torch.float32 and bool(torch.isfinite(grad).all()), grad
    sigma = float(pni_fast.weight_sigma(w))
    gz = (g.double() * z.double()).reshape(alpha.numel(), -1).sum(dim=1).cpu() * sigma
    assert gz.abs().min() > 65504, gz  # the case really leaves fp16's range
    bound = grad_bound(gz, gz.abs(), gz.abs(), torch.float16, torch.float32, 0.0, SIGMA_REL[torch.float32])
    assert_within(grad, gz, bound, "alpha grad beyond the fp16 range")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_rng_state_op_level(backend):
    """Ops given rng_state use (state[0], state[1] + offset) and never modify the state."""
    noise, perturb, alpha_grad, multi, grad_multi = _ops(backend)
    if "rng_state" not in [a.name for a in perturb.default._schema.arguments]:
        pytest.skip("the ops have no rng_state argument (op contract v2 not implemented)")
    base = 2**32 - 3
    state = torch.tensor([SEED, base], dtype=torch.int64, device=DEV)
    v, g, alpha, sigma = _inputs((16, 8, 3, 3), 16, torch.float32)
    vs, gs, alphas, sigmas = [v, v[:3]], [g, g[:3]], [alpha, alpha[:1]], [sigma, sigma]
    pairs = [
        (noise(v, 0, 5, state), noise(v, SEED, base + 5)),
        (perturb(v, alpha, sigma, 0, 5, 72, state), perturb(v, alpha, sigma, SEED, base + 5, 72)),
        (alpha_grad(g, alpha, sigma, 0, 5, 72, state), alpha_grad(g, alpha, sigma, SEED, base + 5, 72)),
    ]
    pairs += zip(multi(vs, alphas, sigmas, 0, [0, 300], [72, 1], state),
                 multi(vs, alphas, sigmas, SEED, [base, base + 300], [72, 1]))
    pairs += zip(grad_multi(gs, alphas, sigmas, 0, [0, 300], [72, 1], state),
                 grad_multi(gs, alphas, sigmas, SEED, [base, base + 300], [72, 1]))
    for i, (with_state, with_seed) in enumerate(pairs):
        assert torch.equal(with_state, with_seed), i
    assert state.tolist() == [SEED, base]


# ---------------------------------------------------------------------------
# Public API: forward/backward vs the paper-faithful reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["layerwise", "channelwise", "elementwise"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float16-alpha32", "bfloat16-alpha32"])
def test_noisy_weight_vs_reference(backend, mode, dtype):
    vdtype, adtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, 16, 3, 3, generator=gen).to(vdtype)
    shape = {"layerwise": (1,), "channelwise": (32, 1, 1, 1), "elementwise": tuple(w0.shape)}[mode]
    inner = {"layerwise": 1, "channelwise": 144, "elementwise": 1}[mode]
    a0 = torch.full(shape, 0.25, dtype=adtype)
    g = torch.randn(w0.shape, generator=gen).to(vdtype)
    w = w0.clone().to(DEV).requires_grad_()
    alpha = a0.clone().to(DEV).requires_grad_()
    out = pni_fast.noisy_weight(w, alpha, seed=SEED, offset=3, backend=_api(backend))
    out.backward(g.to(DEV))
    assert out.dtype == vdtype and alpha.grad.dtype == adtype

    w_ref = w0.double().requires_grad_()
    a_ref = a0.double().requires_grad_()
    z = _z64(w0.numel(), SEED, 3)
    ref = reference_noisy_weight(w_ref, a_ref, z.reshape(w0.shape))
    ref.backward(g.double())
    sigma = float(w0.double().std())  # the reference's; the kernel's own comes from a device std
    torch.testing.assert_close(_flat64(ref), expected_out(w0, a0, sigma, inner, z)[0], rtol=1e-12, atol=1e-12)
    check_perturb(out, w0, a0, sigma, inner, z, sigma_rel=SIGMA_REL[torch.float32])
    assert torch.equal(w.grad.cpu(), g)  # identity
    check_grad(alpha.grad, g, a0, sigma, inner, z, sigma_rel=SIGMA_REL[torch.float32])
    torch.testing.assert_close(_flat64(a_ref.grad), grad_terms(g, a0, sigma, inner, z)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inject_noise_channelwise(backend):
    x = torch.randn(4, 6, 7, 7, device=DEV)
    alpha = torch.full((6,), 0.3, device=DEV, requires_grad=True)
    out = pni_fast.inject_noise(x, alpha, seed=5, offset=0, backend=_api(backend))
    sigma = pni_fast.weight_sigma(x)  # the same function the op uses: the same value
    check_perturb(out, x, alpha, sigma, 49, _z64(x.numel(), 5, 0))
    g = torch.randn_like(x)
    out.backward(g)
    check_grad(alpha.grad, g, alpha, sigma, 49, _z64(x.numel(), 5, 0))


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_autocast_grad_scaler(backend, dtype, monkeypatch):
    """A PNI model under autocast: float32 alpha parameters get finite float32 gradients, no inf steps."""
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        pni_fast.NoisyConv2d(3, 8, 3, padding=1, pni="channelwise", noise="both"), torch.nn.ReLU(),
        pni_fast.NoisyConv2d(8, 8, 3, padding=1, noise="both"), torch.nn.Flatten(),
        pni_fast.NoisyLinear(8 * 8 * 8, 10, pni="channelwise", noise="both"),
    ).to(DEV)
    alphas = {n: p for n, p in model.named_parameters() if n.endswith(("alpha_w", "alpha_i"))}
    assert len(alphas) == 6 and all(p.dtype == torch.float32 for p in alphas.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # a moderate scale: the check is that PNI's gradients stay finite, not how far fp16 activations stretch
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=dtype == torch.float16)
    x = torch.randn(4, 3, 8, 8, device=DEV)
    y = torch.randint(0, 10, (4,), device=DEV)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        assert logits.dtype == dtype
        scaler.scale(loss).backward()
        for name, p in alphas.items():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0), (step, name, p.grad)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == scale, "GradScaler found inf/NaN gradients and skipped the step"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------
# Multi-tensor ops
# ---------------------------------------------------------------------------


def _model_like_lists(count: int):
    """A list like a CIFAR ResNet's noisy weights: mixed modes, one fp16 tensor, one empty tensor."""
    specs = [((16, 3, 3, 3), "channelwise"), ((16, 16, 3, 3), "layerwise"), ((32, 16, 3, 3), "elementwise"),
             ((64, 32, 3, 3), "channelwise"), ((10, 64), "layerwise")]
    vs, gs, alphas, sigmas, offsets, inners = [], [], [], [], [], []
    offset = 0
    gen = torch.Generator().manual_seed(2)
    for i in range(count):
        shape, mode = specs[i % len(specs)]
        dtype = torch.float16 if i == 3 else torch.float32
        v = torch.randn(shape, generator=gen).to(dtype).to(DEV)
        n_alpha, inner = {"layerwise": (1, 1), "channelwise": (shape[0], v.numel() // shape[0]),
                          "elementwise": (v.numel(), 1)}[mode]
        vs.append(v)
        gs.append(torch.randn(shape, generator=gen).to(dtype).to(DEV))
        alphas.append((torch.rand(n_alpha, generator=gen) + 0.1).to(dtype).to(DEV))
        sigmas.append(v.float().std())
        offsets.append(offset)
        inners.append(inner)
        offset += (v.numel() + 3) // 4
    vs.append(torch.empty(0, device=DEV)), gs.append(torch.empty(0, device=DEV))
    alphas.append(torch.ones(1, device=DEV)), sigmas.append(torch.tensor(0.0, device=DEV))
    offsets.append(offset), inners.append(1)
    return vs, gs, alphas, sigmas, offsets, inners


def _shaped_alphas(vs, alphas):
    """Flat alphas reshaped as the public API expects them for weights vs."""
    return [a.reshape(v.shape) if a.numel() == v.numel() and a.numel() > 1 else
            (a.reshape((-1,) + (1,) * (v.dim() - 1)) if a.numel() > 1 else a) for v, a in zip(vs, alphas)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("count", [5, 45])  # 45 > 32 tensors: the CUDA op splits the launch
def test_multi_equals_single(backend, count):
    noise, perturb, alpha_grad, multi, grad_multi = _ops(backend)
    vs, gs, alphas, sigmas, offsets, inners = _model_like_lists(count)
    outs = multi(vs, alphas, sigmas, SEED, offsets, inners)
    grads = grad_multi(gs, alphas, sigmas, SEED, offsets, inners)
    assert len(outs) == len(grads) == len(vs)
    for i, (v, g, a, s, o, n) in enumerate(zip(vs, gs, alphas, sigmas, offsets, inners)):
        assert torch.equal(outs[i], perturb(v, a, s, SEED, o, n)), i  # the same element-wise math
        single = alpha_grad(g, a, s, SEED, o, n)
        assert grads[i].shape == a.shape and grads[i].dtype == a.dtype, i
        if backend == "cuda":
            assert torch.equal(grads[i], single), i  # same kernels, same partial order
        elif v.numel():  # one scan-based reduction for every tensor: each within the bound, not bitwise
            z_own = _flat64(noise(v, SEED, o))
            for got in (grads[i], single):
                check_grad(got, g, a, s, n, z_own, what=f"tensor {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("count", [5, 40])
def test_noisy_weights_backward(backend, count):
    vs, gs, alphas, _, _, _ = _model_like_lists(count)
    vs, gs, alphas = vs[:-1], gs[:-1], _shaped_alphas(vs[:-1], alphas[:-1])
    leaves = [a.clone().requires_grad_() for a in alphas]
    outs = pni_fast.noisy_weights(vs, leaves, seed=SEED, backend=_api(backend))
    torch.autograd.backward(outs, gs)
    offset = 0
    for k, (v, a, g, leaf, out) in enumerate(zip(vs, alphas, gs, leaves, outs)):
        single = a.clone().requires_grad_()
        ref = pni_fast.noisy_weight(v, single, seed=SEED, offset=offset, backend=_api(backend))
        ref.backward(g)
        assert torch.equal(out, ref), k
        if backend == "cuda":
            assert torch.equal(leaf.grad, single.grad), k
        else:
            sigma = pni_fast.weight_sigma(v)
            inner = v.numel() // a.numel() if 1 < a.numel() < v.numel() else 1
            z_own = _flat64(pni_fast.randn(v.shape, seed=SEED, offset=offset, device=DEV, backend="triton"))
            for got in (leaf.grad, single.grad):
                check_grad(got, g, a, sigma, inner, z_own, what=f"tensor {k}")
        offset += (v.numel() + 3) // 4


# ---------------------------------------------------------------------------
# torch.compile, no host sync
# ---------------------------------------------------------------------------


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    w = torch.randn(64, 32, 3, 3, device=DEV)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)

    def step(w, alpha):
        return pni_fast.noisy_weight(w, alpha, seed=1234, offset=0, backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(w, alpha)
    (grad_c,) = torch.autograd.grad(loss_c, alpha)
    loss_e = step(w, alpha)
    (grad_e,) = torch.autograd.grad(loss_e, alpha)
    # the same noise; only the order of the fp32 sums of squares differs
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-5 * float(grad_e.abs().max()))


@real_gpu
@needs_triton
def test_torch_compile_triton_op_directly():
    _, perturb, _, _, _ = _ops("triton")
    v, _, alpha, sigma = _inputs((1000, 3), 1, torch.float32)
    f = torch.compile(lambda v, a, s: perturb(v, a, s, 7, 0, 1) * 2, fullgraph=True)
    assert torch.equal(f(v, alpha, sigma), perturb(v, alpha, sigma, 7, 0, 1) * 2)


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_drawn_seed_fullgraph(backend):
    """seed=None inside torch.compile(fullgraph=True): fresh noise per call, backward uses the forward's noise."""
    torch._dynamo.reset()
    w = torch.randn(64, 32, 3, 3, device=DEV)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)
    g = torch.randn(w.shape, device=DEV)

    def step(w, alpha, g):
        out = pni_fast.noisy_weight(w, alpha, backend=backend)
        return out, (out * g).sum()

    compiled = torch.compile(step, fullgraph=True)
    sigma = float(pni_fast.weight_sigma(w))
    outs = []
    for _ in range(3):
        out, loss = compiled(w, alpha, g)
        (grad,) = torch.autograd.grad(loss, alpha)
        out64, w64 = _flat64(out), _flat64(w)
        z = (out64 - w64) / (0.25 * sigma)  # the noise this forward drew, recovered
        assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.1  # 18432 samples: > 6 sigma
        # z recovered from fp32 values: error from the rounding of out and of the kernel's math
        z_err = 4 * UNIT[torch.float32] * (out64.abs() + w64.abs()) / (0.25 * sigma) + SIGMA_REL[torch.float32] * z.abs()
        exp, abs_gz, abs_g = grad_terms(g, alpha, sigma, 288, z)
        g_err = torch.zeros(64, dtype=torch.float64).index_add_(0, _index(z.numel(), 64, 288), _flat64(g).abs() * z_err)
        bound = grad_bound(exp, abs_gz, abs_g, torch.float32, torch.float32, 0.0, SIGMA_REL[torch.float32])
        assert_within(grad, exp, bound + g_err * sigma, "compiled alpha grad vs the forward's noise")
        outs.append(out.detach().clone())
    for i in range(3):
        for j in range(i):
            assert not torch.equal(outs[i], outs[j]), (i, j)


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_reduce_overhead_fresh_noise(backend, monkeypatch):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) of a NoisyLinear: every call draws new noise."""
    torch._dynamo.reset()
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    layer = pni_fast.NoisyLinear(64, 32, pni="channelwise").to(DEV)
    x = torch.randn(8, 64, device=DEV)
    plain = F.linear(x, layer.weight, layer.bias).detach()
    compiled = torch.compile(layer, mode="reduce-overhead")
    outs = []
    with torch.no_grad():
        for _ in range(6):  # the first calls warm up and record, the later ones replay
            torch.compiler.cudagraph_mark_step_begin()
            outs.append(compiled(x).clone())
    for i, out in enumerate(outs):
        assert bool(torch.isfinite(out).all()) and not torch.allclose(out, plain), i
        for j in range(i):
            assert not torch.equal(out, outs[j]), f"calls {j} and {i} drew the same noise"


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend):
    w = torch.randn(256, 128, device=DEV)
    alpha = torch.full((256, 1), 0.25, device=DEV, requires_grad=True)
    ws, alphas = [w, w[:10]], [alpha, torch.full((1,), 0.1, device=DEV, requires_grad=True)]
    state = pni_fast.make_rng_state(7, DEV) if hasattr(pni_fast, "make_rng_state") else None

    def step():
        for seed in (99, None) + ((state,) if state is not None else ()):
            out = pni_fast.noisy_weight(w, alpha, seed=seed, backend=backend)
            out.sum().backward()
        outs = pni_fast.noisy_weights(ws, alphas, seed=98, backend=backend)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    step()  # compile / load / create the default RNG state outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend):
    pni_fast.randn((4,), seed=1, device=DEV, backend=_api(backend))  # registers fakes / autograd
    _, perturb, alpha_grad, _, _ = _ops(backend)
    v, g, alpha, sigma = _inputs((8, 3, 3, 3), 8, torch.float32)
    torch.library.opcheck(perturb.default, (v, alpha, sigma, 1, 0, 27))
    torch.library.opcheck(alpha_grad.default, (g, alpha, sigma, 1, 0, 27))
    if "rng_state" in [a.name for a in perturb.default._schema.arguments]:
        state = torch.tensor([SEED, 5], dtype=torch.int64, device=DEV)
        torch.library.opcheck(perturb.default, (v, alpha, sigma, 0, 0, 27, state))
        torch.library.opcheck(alpha_grad.default, (g, alpha, sigma, 0, 0, 27, state))


# ---------------------------------------------------------------------------
# RNG state tensors and CUDA graphs
# ---------------------------------------------------------------------------


@needs_rng_state
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_rng_state_eager_semantics(device):
    """seed=state uses (state[0], state[1] + offset) and advances state[1] by the counters used."""
    if device == "cuda" and not ON_GPU:
        pytest.skip("no CUDA device")
    q = lambda t: (t.numel() + 3) // 4  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(10, 7, 9, generator=gen).to(device)
    w2 = torch.randn(5, 3, generator=gen).to(device)
    x = torch.randn(2, 3, 5, 5, generator=gen).to(device)
    g = torch.randn(w.shape, generator=gen).to(device)
    a = torch.full((10, 1, 1), 0.3, device=device)
    a2, ax = torch.full((1,), 0.2, device=device), torch.full((3,), 0.1, device=device)
    state = pni_fast.make_rng_state(SEED, device)
    assert state.dtype == torch.int64 and state.shape == (2,) and state.device.type == device
    assert state.tolist() == [SEED, 0]
    base = 0
    for _ in range(2):  # consecutive calls: consecutive counter ranges
        leaf, ref_leaf = a.clone().requires_grad_(), a.clone().requires_grad_()
        out = pni_fast.noisy_weight(w, leaf, seed=state)
        ref = pni_fast.noisy_weight(w, ref_leaf, seed=SEED, offset=base)
        assert torch.equal(out, ref)
        base += q(w)
        assert state.tolist() == [SEED, base]
        out.backward(g)  # the backward uses the snapshot taken before the advance
        ref.backward(g)
        assert torch.equal(leaf.grad, ref_leaf.grad)
    assert torch.equal(pni_fast.inject_noise(x, ax, seed=state), pni_fast.inject_noise(x, ax, seed=SEED, offset=base))
    base += q(x)
    outs = pni_fast.noisy_weights([w, w2], [a, a2], seed=state)
    assert torch.equal(outs[0], pni_fast.noisy_weight(w, a, seed=SEED, offset=base))
    assert torch.equal(outs[1], pni_fast.noisy_weight(w2, a2, seed=SEED, offset=base + q(w)))
    base += q(w) + q(w2)
    assert torch.equal(pni_fast.randn((5,), seed=state, device=device),
                       pni_fast.randn((5,), seed=SEED, offset=base, device=device))
    assert state.tolist() == [SEED, base + 2]


test_rng_state_eager_semantics.runs_on_cpu = True  # its cpu case needs no GPU


def _capture(step, warmup: int = 2):
    """Warm ``step`` up on a side stream, then capture one call into a CUDA graph; returns (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


def _assert_all_differ(tensors, what):
    for i in range(len(tensors)):
        for j in range(i):
            assert not torch.equal(tensors[i], tensors[j]), f"{what}: replays {j} and {i} are equal"


@real_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_fixed_seed_replays_eager(backend):
    """A captured forward+backward with an int seed replays to the eager result (the same noise each time)."""
    w = torch.randn(64, 32, 3, 3, device=DEV, requires_grad=True)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)
    g = torch.randn(w.shape, device=DEV)

    def step():
        w.grad, alpha.grad = None, None
        out = pni_fast.noisy_weight(w, alpha, seed=77, backend=backend)
        out.backward(g)
        return out

    eager_out = step().detach().clone()
    eager_grad = alpha.grad.clone()
    graph, static_out = _capture(step)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager_out)
        assert torch.equal(alpha.grad, eager_grad)


@real_gpu
@needs_rng_state
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_rng_state_fresh_per_replay(backend):
    """noisy_weight(seed=state) forward+backward in a graph: each replay draws fresh noise, and the
    replays equal the eager sequence from a clone of the starting state, bit for bit."""
    w = torch.randn(64, 32, 3, 3, device=DEV)
    alpha = torch.full((64, 1, 1, 1), 0.25, device=DEV, requires_grad=True)
    g = torch.randn(w.shape, device=DEV)
    state = pni_fast.make_rng_state(SEED, DEV)

    def step():
        alpha.grad = None
        out = pni_fast.noisy_weight(w, alpha, seed=state, backend=backend)
        out.backward(g)
        return out

    graph, static_out = _capture(step)
    start = torch.tensor([SEED, 2**32 - 5], dtype=torch.int64, device=DEV)
    state.copy_(start)  # in place: the graph reads this memory
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append((static_out.clone(), alpha.grad.clone()))
    torch.cuda.synchronize()
    assert state.tolist() == [SEED, 2**32 - 5 + 3 * ((w.numel() + 3) // 4)]
    eager_state = start.clone()
    for k, (out_r, grad_r) in enumerate(replays):
        leaf = alpha.detach().clone().requires_grad_()
        out = pni_fast.noisy_weight(w, leaf, seed=eager_state, backend=backend)
        out.backward(g)
        assert torch.equal(out_r, out), f"replay {k} differs from the eager call"
        assert torch.equal(grad_r, leaf.grad), f"replay {k}: alpha grad differs from the eager one"
    assert torch.equal(eager_state, state)
    _assert_all_differ([r[0] for r in replays], "outputs")


@real_gpu
@needs_rng_state
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_module_seed_none(backend, monkeypatch):
    """A NoisyConv2d (seed=None) captured with its backward: replays use the default RNG state."""
    monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    conv = pni_fast.NoisyConv2d(4, 8, 3, padding=1, pni="channelwise", noise="weight").to(DEV)
    x = torch.randn(2, 4, 8, 8, device=DEV)
    gout = torch.randn(2, 8, 8, 8, device=DEV)

    def step():
        for p in conv.parameters():
            p.grad = None
        out = conv(x)
        out.backward(gout)
        return out

    graph, static_out = _capture(step)  # the eager warm-up creates the default state
    state = pni_fast.default_rng_state(DEV)
    start = torch.tensor([SEED, 777], dtype=torch.int64, device=DEV)
    state.copy_(start)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append((static_out.clone(), conv.alpha_w.grad.clone()))
    torch.cuda.synchronize()
    assert state.tolist() == [SEED, 777 + 3 * ((conv.weight.numel() + 3) // 4)]
    eager_state = start.clone()
    for k, (out_r, grad_r) in enumerate(replays):
        leaf = conv.alpha_w.detach().clone().requires_grad_()
        wn = pni_fast.noisy_weight(conv.weight.detach(), leaf, seed=eager_state)
        out = F.conv2d(x, wn, conv.bias.detach(), padding=1)
        out.backward(gout)
        # cuDNN may pick other (deterministic) algorithms under capture: fp32-rounding close, while other
        # noise would move every output by ~alpha * sigma(w) relative (the bitwise check of the noise
        # itself is test_cuda_graph_rng_state_fresh_per_replay)
        torch.testing.assert_close(out_r, out, rtol=1e-5, atol=1e-5 * float(out.abs().max()),
                                   msg=lambda m: f"replay {k} differs from the eager call: {m}")
        torch.testing.assert_close(grad_r, leaf.grad, rtol=1e-5, atol=1e-5 * float(leaf.grad.abs().max()),
                                   msg=lambda m: f"replay {k}: alpha grad differs from the eager one: {m}")
    _assert_all_differ([r[0] for r in replays], "outputs")

    both = pni_fast.NoisyConv2d(4, 8, 3, padding=1, pni="channelwise", noise="both").to(DEV)
    graph, static_out = _capture(lambda: both(x))
    before = state[1].item()
    outs = []
    for _ in range(3):
        graph.replay()
        outs.append(static_out.clone())
    per_replay = (both.weight.numel() + 3) // 4 + (x.numel() + 3) // 4  # weight noise, then input noise
    assert state[1].item() == before + 3 * per_replay
    _assert_all_differ(outs, "weight + input noise outputs")


@real_gpu
@needs_cuda_ext
def test_cuda_graph_multi_tensor():
    """The CUDA list op passes its tensor table as kernel parameters, so it replays in a graph;
    with an RNG state every replay draws fresh noise, equal to the eager sequence."""
    ws = [torch.randn(16, 8, 3, 3, device=DEV), torch.randn(10, 64, device=DEV)]
    alphas = [torch.full((16, 1, 1, 1), 0.25, device=DEV), torch.full((1,), 0.1, device=DEV)]
    eager = pni_fast.noisy_weights(ws, alphas, seed=21, backend="cuda")
    graph, static = _capture(lambda: pni_fast.noisy_weights(ws, alphas, seed=21, backend="cuda"), warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)
    if not hasattr(pni_fast, "make_rng_state"):
        pytest.skip("pni_fast.make_rng_state is missing (op contract v2 not implemented)")
    state = pni_fast.make_rng_state(SEED, DEV)
    graph, static = _capture(lambda: pni_fast.noisy_weights(ws, alphas, seed=state, backend="cuda"), warmup=1)
    start = torch.tensor([SEED, 10], dtype=torch.int64, device=DEV)
    state.copy_(start)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([s.clone() for s in static])
    eager_state = start.clone()
    for k, rep in enumerate(replays):
        for a, b in zip(rep, pni_fast.noisy_weights(ws, alphas, seed=eager_state, backend="cuda")):
            assert torch.equal(a, b), k
    _assert_all_differ([r[0] for r in replays], "list outputs")


@real_gpu
@needs_triton
def test_triton_multi_refuses_graph_capture():
    _, _, _, multi, _ = _ops("triton")
    v = torch.randn(100, device=DEV)
    args = ([v], [torch.ones(1, device=DEV)], [torch.tensor(1.0, device=DEV)], 1, [0], [1])
    multi(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            multi(*args)
