"""Autograd for the fused ops, in Python so ``torch.func`` and higher-order gradients work.

    out = v + alpha[b(i)] * sigma * z_i
    d out / d v = identity;  dL/dalpha = alpha_grad(g) = sigma * sum_{b(i)=b} g_i z_i  (z regenerated)
    alpha_grad is linear in g: its own vjp is perturb(0, gg, sigma, ...) = gg[b(i)] * sigma * z_i

So the two ops differentiate into each other and every order of derivative needs no new
kernel; only alpha, sigma, the integers and the RNG-state snapshot are saved, never the noise.
Two entry points share these formulas: the ``autograd.Function`` classes used by the public
functions (they carry ``setup_context`` and ``vmap``, which ``torch.func`` needs), and
``torch.library.register_autograd`` on every op for users who call ``torch.ops.pni_fast.*``
directly. Forward-mode AD (``jvp``) is refused with PyTorch's error: a custom ``jvp`` would make
``torch.compile`` break the graph. This file holds the single-tensor functions and the
``register_autograd`` of every op; the list versions are in :mod:`pni_fast.autograd_multi`, the
op-call helpers (``apply``, ``call``) in :mod:`pni_fast.op_call`.

Under ``torch.func.vmap`` the noise is the same for every sample (``randomness="same"``, or
"error" with an explicit seed); ``randomness="different"`` is refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .autograd_multi import AlphaGradMultiFn, PerturbMultiFn, _filled
from .backends import REGISTRY, Backend
from .op_call import apply, call, op_overload  # noqa: F401  (op_overload: pni_fast.fused imports it from here)
from .ops_torch import opmath
from .philox_torch import alpha_view

__all__ = ["PerturbFn", "AlphaGradFn", "PerturbMultiFn", "AlphaGradMultiFn", "apply", "call", "register_op_autograd"]


# ---------------------------------------------------------------------------
# vmap: same noise for every sample
# ---------------------------------------------------------------------------


def _check_vmap(info, state_dim) -> None:
    if info.randomness == "different":
        raise RuntimeError(
            "pni_fast noise under torch.func.vmap(randomness='different') is not supported: every sample "
            "would need its own seed. Use randomness='same' (one noise draw shared by the batch)."
        )
    if state_dim is not None:
        raise RuntimeError("pni_fast: a batched RNG state is not supported under vmap")


def _to_batch(t: Tensor, dim: Optional[int], size: int) -> Tensor:
    return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _vmap_noise(backend: str, like: Tensor, seed, offset, state) -> Tensor:
    return call(REGISTRY[backend].noise, like, seed, offset, state=state)


class PerturbFn(torch.autograd.Function):
    """``v + alpha * sigma * z`` through backend ``backend``'s perturb op."""

    @staticmethod
    def forward(v, alpha, sigma, seed, offset, inner, state, backend):
        return call(
            REGISTRY[backend].perturb, v.contiguous(), alpha.contiguous(), sigma, seed, offset, inner, state=state
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, alpha, sigma, seed, offset, inner, state, backend = inputs
        ctx.save_for_backward(alpha, sigma, state)
        ctx.rng = (seed, offset, inner, backend)

    @staticmethod
    def backward(ctx, grad):
        alpha, sigma, state = ctx.saved_tensors
        seed, offset, inner, backend = ctx.rng
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: record it, so double backward works
                grad_alpha = apply(AlphaGradFn, grad, alpha, sigma, seed, offset, inner, state, backend)
            else:  # the op alone: an autograd.Function costs more than a small layer's kernel
                grad_alpha = call(
                    REGISTRY[backend].alpha_grad,
                    grad.contiguous(),
                    alpha.contiguous(),
                    sigma,
                    seed,
                    offset,
                    inner,
                    state=state,
                )
        return (grad if ctx.needs_input_grad[0] else None), grad_alpha, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, v, alpha, sigma, seed, offset, inner, state, backend):
        _check_vmap(info, in_dims[6])
        b = info.batch_size
        v = _to_batch(v, in_dims[0], b)
        alpha = _to_batch(alpha, in_dims[1], b)
        sigma = _to_batch(sigma, in_dims[2], b)
        om = opmath(v.dtype)
        z = _vmap_noise(backend, v[0], seed, offset, state)
        shape, _ = alpha_view(alpha[0], v[0].numel(), inner)
        out = v.to(om).reshape(b, *shape) + (
            alpha.to(om).reshape(b, 1, -1, 1) * sigma.to(om).reshape(b, 1, 1, 1)
        ) * z.to(om).reshape(1, *shape)
        return out.to(v.dtype).reshape(v.shape), 0


class AlphaGradFn(torch.autograd.Function):
    """``sigma * sum g_i z_i`` per alpha index (the alpha gradient); linear in ``g``."""

    @staticmethod
    def forward(grad, alpha, sigma, seed, offset, inner, state, backend):
        return call(
            REGISTRY[backend].alpha_grad, grad.contiguous(), alpha.contiguous(), sigma, seed, offset, inner, state=state
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, alpha, sigma, seed, offset, inner, state, backend = inputs
        ctx.save_for_backward(sigma, state)
        ctx.rng = (seed, offset, inner, backend)
        ctx.grad_meta = (grad.shape, grad.dtype, grad.device)

    @staticmethod
    def backward(ctx, gg):
        sigma, state = ctx.saved_tensors
        seed, offset, inner, backend = ctx.rng
        d_grad = None
        if ctx.needs_input_grad[0]:
            shape, dtype, device = ctx.grad_meta
            zeros = torch.zeros(shape, dtype=dtype, device=device)
            d_grad = apply(PerturbFn, zeros, gg, sigma, seed, offset, inner, state, backend)
        return d_grad, None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad, alpha, sigma, seed, offset, inner, state, backend):
        _check_vmap(info, in_dims[6])
        b = info.batch_size
        grad = _to_batch(grad, in_dims[0], b)
        sigma = _to_batch(sigma, in_dims[2], b)
        alpha_shape = alpha.shape if in_dims[1] is None else alpha.movedim(in_dims[1], 0).shape[1:]
        om = opmath(grad.dtype)
        n = math.prod(grad.shape[1:])
        z = _vmap_noise(backend, grad[0], seed, offset, state)
        shape, _ = alpha_view(torch.empty(alpha_shape), n, inner)
        partial = (grad.to(om).reshape(b, *shape) * z.to(om).reshape(1, *shape)).sum(dim=(1, 3))
        out = (partial * sigma.to(om).reshape(b, 1)).reshape(b, *alpha_shape)
        return out.to(alpha.dtype), 0


# ---------------------------------------------------------------------------
# register_autograd on the ops themselves (direct torch.ops.pni_fast.* callers, opcheck)
# ---------------------------------------------------------------------------


def _single_setup(backend: str):
    def setup_context(ctx, inputs, output):
        _, alpha, sigma, seed, offset, inner, *rest = inputs
        ctx.n_in = len(inputs)
        ctx.save_for_backward(alpha, sigma, rest[0] if rest else None)
        ctx.rng = (seed, offset, inner, backend)

    return setup_context


def _perturb_backward(ctx, grad):
    grad_v, grad_alpha, *_ = PerturbFn.backward(ctx, grad)
    return (grad_v, grad_alpha, None, None, None, None, None)[: ctx.n_in]


def _alpha_grad_setup(backend: str):
    def setup_context(ctx, inputs, output):
        grad, alpha, sigma, seed, offset, inner, *rest = inputs
        ctx.n_in = len(inputs)
        ctx.save_for_backward(sigma, rest[0] if rest else None)
        ctx.rng = (seed, offset, inner, backend)
        ctx.grad_meta = (grad.shape, grad.dtype, grad.device)

    return setup_context


def _alpha_grad_backward(ctx, gg):
    d_grad, *_ = AlphaGradFn.backward(ctx, gg)
    return (d_grad, None, None, None, None, None, None)[: ctx.n_in]


def _n_passed(inputs) -> int:
    """How many arguments the dispatcher passed: it drops a trailing ``rng_state`` equal to its default (None),
    and the list ops' generated autograd checks the backward's return against that structure."""
    return len(inputs) - 1 if len(inputs) == 7 and inputs[6] is None else len(inputs)


def _multi_setup(backend: str, keep_alphas: bool):
    """setup_context of perturb_multi (keeps alphas for their gradient) and of perturb_alpha_grad_multi."""

    def setup_context(ctx, inputs, output):
        tensors, alphas, sigmas, seed, offsets, inners, *rest = inputs
        ctx.n_in = _n_passed(inputs)
        ctx.save_for_backward(rest[0] if rest else None, *(alphas if keep_alphas else ()), *sigmas)
        ctx.rng = (len(tensors), seed, list(offsets), list(inners), backend)
        ctx.meta = [(t.shape, t.dtype, t.device) for t in tensors]

    return setup_context


def _multi_backward(ctx, grads):
    n, seed, offsets, inners, backend = ctx.rng
    state, *rest = ctx.saved_tensors
    alphas, sigmas = rest[:n], rest[n:]
    grads = _filled(grads, ctx.meta)
    grad_alphas = call(
        REGISTRY[backend].alpha_grad_multi,
        grads,
        list(alphas),
        list(sigmas),
        seed,
        offsets,
        inners,
        state=state,
        below_autograd=False,
    )  # recorded under create_graph: double backward
    return (grads, list(grad_alphas), [None] * n, None, None, None, None)[: ctx.n_in]


def _multi_grad_backward(ctx, ggs):
    n, seed, offsets, inners, backend = ctx.rng
    state, *sigmas = ctx.saved_tensors
    zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta]
    d_grads = call(
        REGISTRY[backend].perturb_multi,
        zeros,
        [g.contiguous() for g in ggs],
        list(sigmas),
        seed,
        offsets,
        inners,
        state=state,
        below_autograd=False,
    )
    return (list(d_grads), [None] * n, [None] * n, None, None, None, None)[: ctx.n_in]


_autograd_ops: set[str] = set()


def register_op_autograd(be: Backend) -> None:
    """Attach autograd to backend ``be``'s ops (each op once)."""

    def reg(op: Optional[str], setup, backward) -> None:
        if op is None or op in _autograd_ops:  # the C++ ops are shared by the cpu and cuda backends
            return
        _autograd_ops.add(op)
        torch.library.register_autograd(f"pni_fast::{op}", backward, setup_context=setup)

    reg(be.perturb, _single_setup(be.name), _perturb_backward)
    reg(be.alpha_grad, _alpha_grad_setup(be.name), _alpha_grad_backward)
    reg(be.perturb_multi, _multi_setup(be.name, keep_alphas=True), _multi_backward)
    reg(be.alpha_grad_multi, _multi_setup(be.name, keep_alphas=False), _multi_grad_backward)
