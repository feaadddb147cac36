"""Autograd of the list ops (``perturb_multi``, ``perturb_alpha_grad_multi``): many tensors, one op call.

``autograd.Function`` takes no lists, so the tensors are flattened into the argument list:
``apply(Fn, n, seed, offsets, inners, state, backend, *tensors, *alphas, *sigmas)``. The formulas are
those of the single-tensor functions in :mod:`pni_fast.autograd`, which also registers the list ops'
autograd for direct ``torch.ops.pni_fast.*`` callers (using ``_filled`` from here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import REGISTRY
from .op_call import apply, call

__all__ = ["PerturbMultiFn", "AlphaGradMultiFn"]


def _split(n: int, flat):
    return list(flat[:n]), list(flat[n : 2 * n]), list(flat[2 * n : 3 * n])


def _filled(grads, meta) -> list[Tensor]:
    """Gradients with None replaced by zeros of the recorded shape (the list ops take every tensor)."""
    return [torch.zeros(s, dtype=d, device=dev) if g is None else g.contiguous() for g, (s, d, dev) in zip(grads, meta)]


class PerturbMultiFn(torch.autograd.Function):
    """perturb for ``n`` tensors in one op call: ``apply(n, seed, offsets, inners, state, backend, *vs, *alphas,
    *sigmas)``."""

    @staticmethod
    def forward(n, seed, offsets, inners, state, backend, *flat):
        vs, alphas, sigmas = _split(n, flat)
        out = call(
            REGISTRY[backend].perturb_multi,
            [v.contiguous() for v in vs],
            [a.contiguous() for a in alphas],
            sigmas,
            seed,
            offsets,
            inners,
            state=state,
        )
        return tuple(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        n, seed, offsets, inners, state, backend, *flat = inputs
        _, alphas, sigmas = _split(n, flat)
        ctx.save_for_backward(state, *alphas, *sigmas)
        ctx.rng = (n, seed, offsets, inners, backend)
        ctx.meta = [(v.shape, v.dtype, v.device) for v in flat[:n]]

    @staticmethod
    def backward(ctx, *grads):
        n, seed, offsets, inners, backend = ctx.rng
        state, *rest = ctx.saved_tensors
        alphas, sigmas = rest[:n], rest[n:]
        grads = _filled(grads, ctx.meta)
        needs_v = ctx.needs_input_grad[6 : 6 + n]
        grad_alphas = [None] * n
        if any(ctx.needs_input_grad[6 + n : 6 + 2 * n]) and torch.is_grad_enabled():  # create_graph: recorded
            grad_alphas = list(
                apply(AlphaGradMultiFn, n, seed, offsets, inners, state, backend, *grads, *alphas, *sigmas)
            )
        elif any(ctx.needs_input_grad[6 + n : 6 + 2 * n]):
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
        grad_vs = [g if need else None for g, need in zip(grads, needs_v)]
        return (None,) * 6 + tuple(grad_vs) + tuple(grad_alphas) + (None,) * n

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError("pni_fast.noisy_weights is not supported under vmap; call noisy_weight per tensor")


class AlphaGradMultiFn(torch.autograd.Function):
    """alpha_grad for ``n`` tensors: ``apply(n, seed, offsets, inners, state, backend, *grads, *alphas, *sigmas)``."""

    @staticmethod
    def forward(n, seed, offsets, inners, state, backend, *flat):
        grads, alphas, sigmas = _split(n, flat)
        out = call(
            REGISTRY[backend].alpha_grad_multi,
            [g.contiguous() for g in grads],
            [a.contiguous() for a in alphas],
            sigmas,
            seed,
            offsets,
            inners,
            state=state,
        )
        return tuple(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        n, seed, offsets, inners, state, backend, *flat = inputs
        grads, alphas, sigmas = _split(n, flat)
        ctx.save_for_backward(state, *sigmas)
        ctx.rng = (n, seed, offsets, inners, backend)
        ctx.meta = [(g.shape, g.dtype, g.device) for g in grads]
        ctx.alpha_meta = [(a.shape, a.dtype, a.device) for a in alphas]

    @staticmethod
    def backward(ctx, *ggs):
        n, seed, offsets, inners, backend = ctx.rng
        state, *sigmas = ctx.saved_tensors
        d_grads = [None] * n
        if any(ctx.needs_input_grad[6 : 6 + n]):
            ggs = _filled(ggs, ctx.alpha_meta)
            zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta]
            d_grads = list(apply(PerturbMultiFn, n, seed, offsets, inners, state, backend, *zeros, *ggs, *sigmas))
        return (None,) * 6 + tuple(d_grads) + (None,) * (2 * n)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError("pni_fast.noisy_weights is not supported under vmap; call noisy_weight per tensor")
