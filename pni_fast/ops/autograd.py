"""Autograd for the fused ops, in Python so ``torch.func`` and higher-order gradients work.

    out = v + alpha[b(i)] * sigma * z_i
    d out / d v = identity;  dL/dalpha = alpha_grad(g) = sigma * sum_{b(i)=b} g_i z_i  (z regenerated)
    alpha_grad is linear in g: its own vjp is perturb(0, gg, sigma, ...) = gg[b(i)] * sigma * z_i

So the two ops differentiate into each other and every order of derivative needs no new
kernel; only alpha, sigma, the integers and the RNG-state snapshot are saved, never the noise.
Two entry points share these formulas: the ``autograd.Function`` classes used by the public
functions (they carry ``setup_context`` and ``vmap``, which ``torch.func`` needs), and
``torch.library.register_autograd`` on every op for users who call ``torch.ops.pni_fast.*``
directly; each backward is written once and used by both. Forward-mode AD (``jvp``) is refused
with PyTorch's error: a custom ``jvp`` would make ``torch.compile`` break the graph.

The list ops (``perturb_multi``, ``perturb_alpha_grad_multi``: many tensors, one op call) have the
same formulas; ``autograd.Function`` takes no lists, so their tensors are flattened into the
argument list: ``apply(Fn, n, seed, offsets, inners, state, backend, *tensors, *alphas, *sigmas)``.

Under ``torch.func.vmap`` the noise is the same for every sample (``randomness="same"``, or
"error" with an explicit seed); ``randomness="different"`` is refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..contract import alpha_view, opmath
from .call import apply, call
from .registry import REGISTRY, Backend

__all__ = ["PerturbFn", "AlphaGradFn", "PerturbMultiFn", "AlphaGradMultiFn", "register_op_autograd"]


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
# The list ops
# ---------------------------------------------------------------------------


def _split(n: int, flat):
    return list(flat[:n]), list(flat[n : 2 * n]), list(flat[2 * n : 3 * n])


def _call_list(op: str, n: int, seed, offsets, inners, state, flat) -> tuple:
    """List op ``op`` on the flattened ``(*tensors, *alphas, *sigmas)``."""
    tensors, alphas, sigmas = _split(n, flat)
    contiguous = [t.contiguous() for t in tensors]
    return tuple(call(op, contiguous, [a.contiguous() for a in alphas], sigmas, seed, offsets, inners, state=state))


def _save_list_context(ctx, tensors, alphas, sigmas, seed, offsets, inners, state, backend, keep_alphas: bool) -> None:
    """What a list op's backward needs (both entry points): the RNG arguments, sigmas, the shapes of the
    tensors and alphas, and the alphas themselves for perturb_multi's alpha gradient (``keep_alphas``)."""
    ctx.save_for_backward(state, *(alphas if keep_alphas else ()), *sigmas)
    ctx.rng = (len(tensors), seed, list(offsets), list(inners), backend)
    ctx.meta = [(t.shape, t.dtype, t.device) for t in tensors]
    ctx.alpha_meta = [(a.shape, a.dtype, a.device) for a in alphas]


def _filled(grads, meta) -> list[Tensor]:
    """Gradients with None replaced by zeros of the recorded shape (the list ops take every tensor)."""
    return [torch.zeros(s, dtype=d, device=dev) if g is None else g.contiguous() for g, (s, d, dev) in zip(grads, meta)]


class PerturbMultiFn(torch.autograd.Function):
    """perturb for ``n`` tensors in one op call: ``apply(n, seed, offsets, inners, state, backend, *vs, *alphas,
    *sigmas)``."""

    @staticmethod
    def forward(n, seed, offsets, inners, state, backend, *flat):
        return _call_list(REGISTRY[backend].perturb_multi, n, seed, offsets, inners, state, flat)

    @staticmethod
    def setup_context(ctx, inputs, output):
        n, seed, offsets, inners, state, backend, *flat = inputs
        _save_list_context(ctx, *_split(n, flat), seed, offsets, inners, state, backend, keep_alphas=True)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.rng[0]
        need = ctx.needs_input_grad
        grad_vs, grad_alphas = _perturb_multi_backward(ctx, grads, need[6 : 6 + n], need[6 + n : 6 + 2 * n])
        return (None,) * 6 + tuple(grad_vs) + tuple(grad_alphas) + (None,) * n

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError("pni_fast.noisy_weights is not supported under vmap; call noisy_weight per tensor")


class AlphaGradMultiFn(torch.autograd.Function):
    """alpha_grad for ``n`` tensors: ``apply(n, seed, offsets, inners, state, backend, *grads, *alphas, *sigmas)``."""

    @staticmethod
    def forward(n, seed, offsets, inners, state, backend, *flat):
        return _call_list(REGISTRY[backend].alpha_grad_multi, n, seed, offsets, inners, state, flat)

    @staticmethod
    def setup_context(ctx, inputs, output):
        n, seed, offsets, inners, state, backend, *flat = inputs
        _save_list_context(ctx, *_split(n, flat), seed, offsets, inners, state, backend, keep_alphas=False)

    @staticmethod
    def backward(ctx, *ggs):
        n = ctx.rng[0]
        d_grads = _alpha_grad_multi_backward(ctx, ggs) if any(ctx.needs_input_grad[6 : 6 + n]) else [None] * n
        return (None,) * 6 + tuple(d_grads) + (None,) * (2 * n)


def _perturb_multi_backward(ctx, grads, needs_v, needs_alpha) -> tuple[list, list]:
    """perturb_multi's backward (both entry points): the tensors' gradients pass through, the alphas'
    are ``alpha_grad_multi`` of them, recorded (double backward) when grad mode is on (create_graph)."""
    n, seed, offsets, inners, backend = ctx.rng
    state, *rest = ctx.saved_tensors
    alphas, sigmas = rest[:n], rest[n:]
    grads = _filled(grads, ctx.meta)
    grad_alphas: list = [None] * n
    if any(needs_alpha) and torch.is_grad_enabled():
        grad_alphas = list(apply(AlphaGradMultiFn, n, seed, offsets, inners, state, backend, *grads, *alphas, *sigmas))
    elif any(needs_alpha):
        grad_alphas = list(
            call(
                REGISTRY[backend].alpha_grad_multi,
                grads,
                [a.contiguous() for a in alphas],
                list(sigmas),
                seed,
                offsets,
                inners,
                state=state,
            )
        )
    return [g if need else None for g, need in zip(grads, needs_v)], grad_alphas


def _alpha_grad_multi_backward(ctx, ggs) -> list:
    """perturb_alpha_grad_multi's backward (both entry points): it is linear in the gradients, so its own
    vjp is perturb_multi of zeros with the incoming alpha gradients as alphas."""
    n, seed, offsets, inners, backend = ctx.rng
    state, *sigmas = ctx.saved_tensors
    ggs = _filled(ggs, ctx.alpha_meta)
    zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta]
    return list(apply(PerturbMultiFn, n, seed, offsets, inners, state, backend, *zeros, *ggs, *sigmas))

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError("pni_fast.noisy_weights is not supported under vmap; call noisy_weight per tensor")


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
    """setup_context of perturb_multi (keeps alphas for their gradient) and of perturb_alpha_grad_multi:
    the same context as :class:`PerturbMultiFn` / :class:`AlphaGradMultiFn` save, so their backwards serve."""

    def setup_context(ctx, inputs, output):
        tensors, alphas, sigmas, seed, offsets, inners, *rest = inputs
        ctx.n_in = _n_passed(inputs)
        state = rest[0] if rest else None
        _save_list_context(ctx, tensors, alphas, sigmas, seed, offsets, inners, state, backend, keep_alphas)

    return setup_context


def _multi_backward(ctx, grads):
    n = ctx.rng[0]
    grad_vs, grad_alphas = _perturb_multi_backward(ctx, grads, [True] * n, [True] * n)
    return (grad_vs, grad_alphas, [None] * n, None, None, None, None)[: ctx.n_in]


def _multi_grad_backward(ctx, ggs):
    n = ctx.rng[0]
    return (_alpha_grad_multi_backward(ctx, ggs), [None] * n, [None] * n, None, None, None, None)[: ctx.n_in]


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
