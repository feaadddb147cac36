"""What only the Triton backend (pni_fast/triton) promises, beyond the contract every backend meets
(tests/test_kernels_*.py, parametrized by backend, run the Triton kernels against the oracle):
tl.randn4x's constants, its argument errors (TypeError / ValueError naming the argument), GPU
compilation without a GPU, one compiled kernel for every seed, and torch.compile with a seed drawn
inside the graph.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1 before triton is imported); with a GPU on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import pni_fast.backends.triton  # noqa: E402, F401  (registers torch.ops.pni_fast.*_triton)
from pni_fast.backends.triton.launch_config import INTERPRETED  # noqa: E402

from kernels import check_noise, own_and_oracle_z  # noqa: E402
from oracle import CASES, Bounds, inputs  # noqa: E402
from repo import ROOT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on CPU tensors",
        allow_module_level=True,
    )
ops = torch.ops.pni_fast
SEED = 0x1234_5678_9ABC  # > 2^32: exercises the high key word
OFFSET = 37
# The interpreter converts to bfloat16 by truncation (GPUs round to nearest).
BOUNDS = Bounds(bf16_truncates=INTERPRETED)


class _Triton:
    """The triton kernel for own_and_oracle_z (tests/support/kernels.py's interface, without a fixture)."""

    interpreted = INTERPRETED
    noise = ops.noise_triton


def test_randn4x_contract_constants():
    """The uniform scale and 2*pi of tl.randn4x are the contract's fp32 constants."""
    import inspect

    from triton.language import random

    src = inspect.getsource(random)
    assert "4.6566127342e-10" in src
    assert np.float32(6.283185307179586) == np.float32(6.2831855)
    assert np.float32(4.6566127342e-10).view(np.uint32) == 0x2FFFFFFF


# ---------------------------------------------------------------------------
# argument errors name the argument
# ---------------------------------------------------------------------------


def test_argument_errors():
    v = torch.randn(4, 6, device=DEVICE)
    alpha = torch.rand(4, device=DEVICE)
    sigma = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match=r"alpha must have dtype torch.float32 \(the dtype of v\)"):
        ops.perturb_triton(v, alpha.double(), sigma, 1, 0, 6)
    with pytest.raises(TypeError, match="v must be float32"):
        ops.perturb_triton(v.int(), alpha.int(), sigma, 1, 0, 6)
    with pytest.raises(ValueError, match="sigma must be a 0-d tensor"):
        ops.perturb_triton(v, alpha, sigma.reshape(1), 1, 0, 6)
    with pytest.raises(ValueError, match="seed must be in"):
        ops.perturb_triton(v, alpha, sigma, -1, 0, 6)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        ops.perturb_alpha_grad_triton(v, alpha, sigma, 1, -4, 6)
    with pytest.raises(ValueError, match="inner must be >= 1"):
        ops.perturb_triton(v, alpha, sigma, 1, 0, 0)
    with pytest.raises(ValueError, match="does not fit v"):
        ops.perturb_triton(v, alpha, sigma, 1, 0, 5)
    with pytest.raises(ValueError, match="same length"):
        ops.perturb_multi_triton([v], [alpha, alpha], [sigma], [1], [0], [6])
    if DEVICE == "cpu":
        assert INTERPRETED


# ---------------------------------------------------------------------------
# GPU compilation without a GPU
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_approx_math():
    """triton.compile every kernel for sm_90 (bundled ptxas) through Triton's launch binder, in the
    aligned (pointers and sizes divisible by 16: vectorized) and unaligned variants real tensors
    get: catches what the interpreter cannot, checks that no PTX has an .approx instruction or an
    ftz sqrt, that the aligned element-wise variants vectorize, and that seeds and offsets of
    1, 16, 17 share one compiled kernel."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pni_fast.backends.triton.compile_check", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _subprocess_without_interpreter(code: str) -> subprocess.CompletedProcess:
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


# ---------------------------------------------------------------------------
# specialization: one compiled kernel for every seed
# ---------------------------------------------------------------------------


def _kernels():
    from pni_fast.backends.triton import alpha_grad_kernels, list_kernels, noise_kernels, perturb_kernels

    modules = (alpha_grad_kernels, list_kernels, noise_kernels, perturb_kernels)
    return {name: getattr(m, name) for m in modules for name in dir(m) if name.endswith("_kernel")}


def test_seed_and_offset_are_not_specialized():
    """Every kernel taking a seed or an offset lists them in do_not_specialize (Triton would
    otherwise compile again for values equal to 1 or divisible by 16)."""
    import inspect

    checked = 0
    for name, fn in _kernels().items():
        params = inspect.signature(fn.fn).parameters
        dns = fn.kwargs.get("do_not_specialize") if INTERPRETED else fn.do_not_specialize
        for arg in ("seed", "offset"):
            if arg in params:
                assert arg in set(dns or ()), f"{name}: {arg} is not in do_not_specialize"
                checked += 1
    assert checked == 6  # noise, fwd, bwd: seed + offset (the list kernels read both from their table)


@pytest.mark.slow
def test_seeds_16_and_17_share_one_compiled_kernel():
    """Triton's own launch binder (sm_90, no GPU needed) gives seeds 16 and 17 one cache key;
    the same kernel without do_not_specialize gives two (so the check can fail)."""
    proc = _subprocess_without_interpreter("""
import torch, triton
from pni_fast.backends.triton.noise_kernels import noise_kernel
from pni_fast.backends.triton.compile_check import cache_key
out = torch.empty(4096)
kw = dict(BLOCK=1024, HAS_STATE=False, PRECISE=True)
same = {cache_key(noise_kernel, (out, out, 4096, seed, 16), kw) for seed in (16, 17)}
plain = triton.jit(noise_kernel.fn)
different = {cache_key(plain, (out, out, 4096, seed, 16), kw) for seed in (16, 17)}
print(len(same), len(different))
""")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["1", "2"]


# ---------------------------------------------------------------------------
# torch.compile with a seed drawn inside the graph (a SymInt)
# ---------------------------------------------------------------------------


def test_torch_compile_with_drawn_seed_fullgraph():
    """A seed from .item() is an unbacked SymInt: the argument checks must not guard on it."""
    import torch._dynamo

    shape, alpha_shape, inner = CASES["conv-channelwise-27"]
    v, g, alpha, sigma = inputs(shape, alpha_shape, device=DEVICE)

    def f(v, g, alpha, sigma, seed_t):
        seed = seed_t.item()
        out = ops.perturb_triton(v, alpha, sigma, seed, OFFSET, inner)
        grad = ops.perturb_alpha_grad_triton(g, alpha, sigma, seed, OFFSET, inner)
        z = ops.noise_triton(v, seed, OFFSET)
        outs = ops.perturb_multi_triton([v], [alpha], [sigma], [seed], [OFFSET], [inner])
        grads = ops.perturb_alpha_grad_multi_triton([g], [alpha], [sigma], [seed], [OFFSET], [inner])
        return out, grad, z, outs[0], grads[0]

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        for seed in (SEED, 16):
            out, grad, z, out_m, grad_m = compiled(v, g, alpha, sigma, torch.tensor(seed))
            z_oracle, z_own = own_and_oracle_z(_Triton, v, seed, OFFSET, z=z)  # the compiled graph's own noise
            BOUNDS.check_perturb(out, v, alpha, sigma, inner, z_oracle, z_own)
            assert torch.equal(out_m, out)
            for got, what in ((grad, "single"), (grad_m, "multi")):
                BOUNDS.check_grad(got, g, alpha, sigma, inner, z_oracle, z_own, what=f"{what} alpha grad")
    torch._dynamo.reset()


def _state(seed: int, base: int) -> torch.Tensor:
    return torch.tensor([seed, base], dtype=torch.int64, device=DEVICE)


def test_rng_state_errors():
    v = torch.randn(4, 6, device=DEVICE)
    alpha = torch.rand(4, device=DEVICE)
    sigma = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="rng_state must be an int64 tensor"):
        ops.perturb_triton(v, alpha, sigma, 0, 0, 6, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"rng_state must have shape \[2\]"):
        ops.noise_triton(v, 0, 0, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="rng_state must be contiguous"):
        ops.perturb_alpha_grad_triton(v, alpha, sigma, 0, 0, 6, torch.zeros(4, dtype=torch.int64, device=DEVICE)[::2])
    with pytest.raises(ValueError, match="rng_state must have shape"):
        ops.perturb_multi_triton([v], [alpha], [sigma], [0], [0], [6], torch.zeros(1, dtype=torch.int64, device=DEVICE))
    if DEVICE == "cpu":  # on CUDA the values stay on the device and are not checked (no host sync)
        with pytest.raises(ValueError, match=r"rng_state\[0\] \(the seed\) must be in"):
            ops.perturb_triton(v, alpha, sigma, 0, 0, 6, _state(-1, 0))
        with pytest.raises(ValueError, match="counter base"):
            ops.noise_triton(v, 0, 0, _state(1, -5))
        with pytest.raises(ValueError, match="offset \\+ ceil"):
            ops.perturb_alpha_grad_multi_triton([v], [alpha], [sigma], [0], [4], [6], _state(1, 2**63 - 8))


def test_counter_limit():
    """offset + ceil(numel / 4) < 2**63: the last counter, offset + ceil(numel / 4) - 1, stays below 2**63 - 1."""
    like = torch.empty(8, device=DEVICE)  # 2 counters
    check_noise(_Triton, ops.noise_triton(like, 3, 2**63 - 3), 3, 2**63 - 3)
    with pytest.raises(ValueError, match="offset \\+ ceil"):
        ops.noise_triton(like, 3, 2**63 - 2)


def test_inner_zero_only_for_zero_size():
    alpha = torch.full((4, 1), 0.5, device=DEVICE)
    with pytest.raises(ValueError, match="inner must be >= 1"):
        ops.perturb_triton(torch.ones(4, 1, device=DEVICE), alpha, torch.tensor(1.0, device=DEVICE), 1, 0, 0)
