"""The public PNI functions: ``w' = w + alpha * std(w) * z`` in one fused pass, differentiable.

This layer validates arguments (:mod:`pni_fast.arg_checks`), computes ``sigma`` on the device
(:mod:`pni_fast.sigma`; no ``.item()`` on GPU), chooses the seed source (:mod:`pni_fast.rng`) and
the backend (:mod:`pni_fast.op_registration`), and calls the backend's op through the autograd
functions of :mod:`pni_fast.autograd`, or the eager fast path (:mod:`pni_fast.fused`).
The backward never stores the noise: it regenerates ``z`` from ``(seed, offset)``.

Seeds: ``seed=None`` draws a fresh seed per call from PyTorch's default CPU generator
(``torch.manual_seed`` makes a run reproducible; this advances that generator and never
touches the GPU). ``seed`` may also be an RNG state tensor (:func:`pni_fast.make_rng_state`),
read on the device and advanced in place: the graph-safe source, used automatically for
``seed=None`` while a CUDA graph is being captured. Under ``torch.compile(fullgraph=True)``
a drawn seed traces as a symbolic integer (no graph break); inductor replays the draw with
its own random stream, so compiled noise is fresh per call but not bit-equal to eager's.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from . import fused
from . import rng as _rng
from .arg_checks import (
    _activation_inner,
    _check_alpha,
    _check_finite,
    _check_tensor,
    _weight_inner,  # noqa: F401  (benchmarks/fixed_cost_pieces.py reads it here)
    checked_weight_inner,
    weight_plan,
)
from .autograd import PerturbFn, PerturbMultiFn, apply, call
from .backends import REGISTRY
from .op_registration import _backend_for
from .rng import SEED_LIMIT, default_rng_state, draw_seed, make_rng_state, rng_args
from .sigma import _sigma_torch, weight_sigma, weight_sigmas  # noqa: F401  (_sigma_torch: tests import it here)

__all__ = [
    "noisy_weight",
    "inject_noise",
    "noisy_weights",
    "randn",
    "draw_seed",
    "make_rng_state",
    "default_rng_state",
    "weight_sigma",
    "weight_sigmas",
    "SEED_LIMIT",
]

Seed = Union[int, Tensor, None]


def _quads(n: int) -> int:
    return -(-n // 4)


def _perturb(name: str, t: Tensor, alpha: Tensor, inner: int, seed: Seed, offset, backend: Optional[str]) -> Tensor:
    """The shared tail of noisy_weight / inject_noise once ``alpha``'s layout is known."""
    chosen = _backend_for(backend, t.device.type)
    if fused.usable(chosen, t, seed):  # one C++ call: sigma, checks, seed, perturb (same results)
        offset = _rng.checked_offset(offset, _quads(t.numel()))
        seed = _rng.checked_seed(seed)
        return fused.noisy(t, alpha, offset, inner, seed, name, _rng.seed_generator())
    rng = rng_args(seed, offset, t.device, _quads(t.numel()))
    sigma = weight_sigma(t)
    _check_finite(sigma, name, (alpha,))
    out = apply(PerturbFn, t, alpha, sigma, rng.seed, rng.offset, inner, rng.state, chosen)
    rng.advance()
    return out


def noisy_weight(
    weight: Tensor,
    alpha: Tensor,
    *,
    seed: Seed = None,
    offset: int = 0,
    backend: Optional[str] = None,
) -> Tensor:
    """PNI-W: ``weight + alpha * std(weight) * z`` in one fused pass; differentiable in both.

    Args:
        weight: a floating tensor (any shape; a conv weight is ``[O, I, kh, kw]``).
        alpha: 1 element (layerwise), ``[O, 1, ...]`` (channelwise) or ``weight.shape``
            (elementwise); weight's dtype (or float32 for a float16/bfloat16 weight) and device.
        seed: Philox seed in [0, 2**63); None draws one from torch's default CPU generator; an RNG state
            tensor (:func:`pni_fast.make_rng_state`) is read on the device and advanced in place.
        offset: Philox counter offset (element ``i`` uses counter ``offset + i // 4``).
        backend: "cpu", "cuda", "triton", "torch" or None (``$PNI_FAST_BACKEND``, else automatic).
    """
    return _perturb("weight", weight, alpha, checked_weight_inner(weight, alpha), seed, offset, backend)


def inject_noise(
    x: Tensor,
    alpha: Tensor,
    *,
    seed: Seed = None,
    offset: int = 0,
    backend: Optional[str] = None,
) -> Tensor:
    """PNI-A: ``x + alpha * std(x) * z`` for activations (sigma over the whole tensor).

    ``alpha`` has 1 element, ``x.shape[1]`` elements (per channel) or ``x.shape[1:]`` (per feature).
    Other arguments as in :func:`noisy_weight`.
    """
    _check_tensor("x", x)
    _check_alpha(alpha, x, "x")
    return _perturb("x", x, alpha, _activation_inner(x, alpha), seed, offset, backend)


def noisy_weights(
    weights: Sequence[Tensor],
    alphas: Sequence[Tensor],
    *,
    seed: Union[Seed, Sequence[int]] = None,
    backend: Optional[str] = None,
) -> list[Tensor]:
    """:func:`noisy_weight` for many tensors at once (one launch where the backend supports it).

    ``seed`` an int, None or an RNG state: tensor ``k`` uses the counters after those of tensors
    ``0..k-1`` under that one seed, so the result equals calling :func:`noisy_weight` per tensor with
    those offsets. ``seed`` a list of ints, one per tensor: tensor ``k`` uses ``seed[k]`` from counter 0,
    so the result equals ``[noisy_weight(w, a, seed=s) for w, a, s in zip(weights, alphas, seed)]`` bit
    for bit, forward and backward (what whole-model batching uses, :mod:`pni_fast.batching`).
    """
    weights, alphas = list(weights), list(alphas)
    if len(weights) != len(alphas):
        raise ValueError(f"weights and alphas must have the same length, got {len(weights)} and {len(alphas)}")
    per_tensor = isinstance(seed, (list, tuple))
    if per_tensor:
        if len(seed) != len(weights):
            raise ValueError(f"seed as a list must hold one seed per tensor ({len(weights)}), got {len(seed)}")
        seeds = [_rng.checked_seed(s) for s in seed]
    if not weights:
        return []
    offsets, inners, counter = weight_plan(weights, alphas)
    device = weights[0].device
    chosen = _backend_for(backend, device.type)
    if per_tensor:
        offsets = [0] * len(weights)  # each tensor's own key from counter 0
    if fused.usable(chosen, weights[0], None if per_tensor else seed) and fused.multi_dtype_ok(weights):
        if per_tensor:
            return fused.noisy_multi(weights, alphas, offsets, inners, seeds, "weights", None)
        seed = _rng.checked_seed(seed)
        _rng.checked_offset(0, counter)
        generator = _rng.seed_generator()
        return fused.noisy_multi(
            weights, alphas, offsets, inners, None if seed is None else [seed], "weights", generator
        )
    sigmas = weight_sigmas(weights)
    if per_tensor:
        rng = _rng.RngArgs(0, 0, None, None, 0)
    else:
        rng = rng_args(seed, 0, device, counter)
        seeds = [rng.seed]
    _check_finite(torch.stack(sigmas), "weights", alphas)
    multi = REGISTRY[chosen].perturb_multi
    if multi is None:
        per = seeds if per_tensor else seeds * len(weights)
        outs = [
            apply(PerturbFn, w, a, s, k, o, i, rng.state, chosen)
            for w, a, s, k, o, i in zip(weights, alphas, sigmas, per, offsets, inners)
        ]
    elif torch.compiler.is_compiling():  # dynamo traces the op's registered autograd, not the flattened Function
        outs = list(
            call(
                multi,
                [w.contiguous() for w in weights],
                [a.contiguous() for a in alphas],
                sigmas,
                seeds,
                offsets,
                inners,
                state=rng.state,
            )
        )
    else:
        outs = list(
            apply(PerturbMultiFn, len(weights), seeds, offsets, inners, rng.state, chosen, *weights, *alphas, *sigmas)
        )
    rng.advance()
    return outs


def randn(
    shape: Sequence[int] | torch.Size | int,
    *,
    seed: Seed,
    offset: int = 0,
    device: torch.device | str | None = None,
    backend: Optional[str] = None,
) -> Tensor:
    """The noise ``z`` the fused ops use for ``(seed, offset)``: float32 of ``shape``."""
    shape = (shape,) if not isinstance(shape, (tuple, list, torch.Size)) else shape
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {list(shape)}")
    like = torch.empty(shape, device=device)
    rng = rng_args(seed, offset, like.device, _quads(like.numel()))
    chosen = _backend_for(backend, like.device.type)
    out = call(REGISTRY[chosen].noise, like, rng.seed, rng.offset, state=rng.state)
    rng.advance()
    return out
