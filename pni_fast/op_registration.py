"""Which backend runs a call, and what a backend's ops need before their first call.

Ops are prepared lazily, the first time a backend is chosen: its op module is imported (so
``import pni_fast`` does not load Triton), the C++ ops get fake kernels (for ``torch.compile``
and ``opcheck``, with the real kernels' argument checks) and every op gets autograd
(:mod:`pni_fast.autograd`). The pure-PyTorch backend is prepared on import.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import (
    backends,
    op_checks,
    ops_torch,  # noqa: F401  (registers the pure-PyTorch ops)
)
from .autograd import register_op_autograd
from .backends import REGISTRY

_registered: set[str] = set()


def _trace_constant(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (2 s) at import time:
    that decorator only sets this attribute, which dynamo reads when it traces a call to ``fn``."""
    fn._dynamo_marked_constant = True
    return fn


def _register_cpp_fakes() -> None:
    """Fake kernels of the C++ ops, with the argument checks of the real kernels (pni_fast/op_checks.py)."""

    def words_like(like, seed, offset, rng_state=None, dtype=torch.int32, op="rng_words"):
        op_checks.check_noise(op, like, seed, offset, rng_state)
        return like.new_empty((4 * (-(-like.numel() // 4)),), dtype=dtype)

    def noise(like, seed, offset, rng_state=None):
        op_checks.check_noise("noise", like, seed, offset, rng_state)
        return like.new_empty(like.shape, dtype=torch.float32)

    def perturb(v, alpha, sigma, seed, offset, inner, rng_state=None):
        op_checks.check_perturb("perturb", "v", v, alpha, sigma, seed, offset, inner, rng_state)
        return v.new_empty(v.shape)

    def alpha_grad(grad, alpha, sigma, seed, offset, inner, rng_state=None):
        op_checks.check_perturb("perturb_alpha_grad", "grad", grad, alpha, sigma, seed, offset, inner, rng_state)
        return alpha.new_empty(alpha.shape)

    def perturb_multi(vs, alphas, sigmas, seeds, offsets, inners, rng_state=None):
        op_checks.check_perturb_multi("perturb_multi", "v", vs, alphas, sigmas, seeds, offsets, inners, rng_state)
        return [v.new_empty(v.shape) for v in vs]

    def alpha_grad_multi(grads, alphas, sigmas, seeds, offsets, inners, rng_state=None):
        op_checks.check_perturb_multi(
            "perturb_alpha_grad_multi", "grad", grads, alphas, sigmas, seeds, offsets, inners, rng_state
        )
        return [a.new_empty(a.shape) for a in alphas]

    torch.library.register_fake("pni_fast::noise")(noise)
    torch.library.register_fake("pni_fast::rng_words")(words_like)
    torch.library.register_fake("pni_fast::rng_uniform")(
        lambda like, seed, offset, rng_state=None: words_like(
            like, seed, offset, rng_state, torch.float32, "rng_uniform"
        )
    )
    torch.library.register_fake("pni_fast::perturb")(perturb)
    torch.library.register_fake("pni_fast::perturb_alpha_grad")(alpha_grad)
    torch.library.register_fake("pni_fast::perturb_multi")(perturb_multi)
    torch.library.register_fake("pni_fast::perturb_alpha_grad_multi")(alpha_grad_multi)


def _ensure_registered(backend: str) -> None:
    """Import a backend's op module, attach fake kernels (C++ ops) and autograd, once per backend."""
    if backend in _registered:
        return
    be = REGISTRY[backend]
    if be.module is not None:
        importlib.import_module(be.module)
    if be.cpp and "cpp" not in _registered:
        _register_cpp_fakes()
        _registered.add("cpp")
    register_op_autograd(be)
    _registered.add(backend)


_ensure_registered("torch")


@_trace_constant
def _backend_for(name: Optional[str], device_type: str) -> str:
    """Resolve and prepare the backend; a trace-time constant under torch.compile."""
    chosen = backends.resolve_cached(name, device_type)
    if chosen not in _registered:
        _ensure_registered(chosen)
    return chosen
