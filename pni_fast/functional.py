"""The public PNI functions: ``w' = w + alpha * std(w) * z`` in one fused pass, differentiable.

This layer validates arguments (below: the op contract's rules of :mod:`pni_fast.contract`, worded
with the public arguments' names, and alpha's shape read as the contract's ``inner``), computes
``sigma`` on the device (:mod:`pni_fast.ops.sigma`; no ``.item()`` on GPU), chooses the seed source
(:mod:`pni_fast.rng`) and the backend (:mod:`pni_fast.ops.dispatch`), and calls the backend's op
through the autograd functions of :mod:`pni_fast.ops.autograd`, or the eager fast path
(:mod:`pni_fast.ops.fast_path`).
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

import math
import operator
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from . import contract
from . import rng as _rng
from .contract import quads
from .ops import fast_path
from .ops.autograd import PerturbFn, PerturbMultiFn
from .ops.call import apply, call
from .ops.dispatch import backend_for
from .ops.registry import REGISTRY
from .ops.sigma import weight_sigma, weight_sigmas
from .rng import under_vmap

__all__ = ["noisy_weight", "inject_noise", "noisy_weights", "randn"]

Seed = Union[int, Tensor, None]


# ---------------------------------------------------------------------------
# Arguments: the public names and alpha's shape read as the contract's ``inner``
# ---------------------------------------------------------------------------
#
# The ops take ``inner`` (how many consecutive elements share one alpha value, docs/design.md
# section 1); the public functions take an alpha whose shape names the PNI mode. These turn one into
# the other and refuse, with the argument's name, what fits no mode or dtype; the CPU finite check of
# sigma and alpha needs no device sync there.


def _check_alpha(alpha, ref: Tensor, ref_name: str) -> None:
    """alpha for tensor ``ref_name``: the op contract's alpha rules, worded with the public argument's name."""
    if not isinstance(alpha, Tensor):
        contract.fail("tensor_type", name="alpha", type=type(alpha).__name__)
    contract.require(
        alpha.device == ref.device, "alpha_device", vname=ref_name, device=ref.device, alpha_device=alpha.device
    )
    contract.check_alpha_dtype(alpha, ref.dtype, ref_name)
    # a zero-size tensor (a layer with 0 output channels) takes the zero-size alpha of its layer's shape
    contract.require(alpha.numel() > 0 or ref.numel() == 0, "alpha_empty", vname=ref_name, alpha_shape=alpha.shape)


def _weight_inner(weight: Tensor, alpha: Tensor) -> int:
    """The contract's ``inner`` for a weight's alpha, inferred from alpha's shape (>= 1, also for empty weights)."""
    if alpha.numel() == 1 or tuple(alpha.shape) == tuple(weight.shape):
        return 1
    out = weight.shape[0] if weight.dim() > 0 else 1
    channel_shapes = {(out,) + (1,) * k for k in range(weight.dim())}
    if tuple(alpha.shape) in channel_shapes:
        return max(1, weight.numel() // max(out, 1))
    raise ValueError(
        f"alpha must have 1 element (layerwise), shape {[out] + [1] * (weight.dim() - 1)} (channelwise) "
        f"or the weight's shape {list(weight.shape)} (elementwise), got {list(alpha.shape)}"
    )


def _activation_inner(x: Tensor, alpha: Tensor) -> int:
    """``inner`` for activation noise: scalar, per channel (dim 1) or per feature (``x.shape[1:]``)."""
    if alpha.numel() == 1:
        return 1
    if x.dim() >= 2:
        if tuple(alpha.shape) == tuple(x.shape[1:]):
            return 1
        c = x.shape[1]
        ones = (1,) * max(0, x.dim() - 2)
        per_channel = {(c,)} | {(c,) + ones[:k] for k in range(len(ones) + 1)} | {(1, c) + ones}
        if tuple(alpha.shape) in per_channel:
            return max(math.prod(x.shape[2:]), 1)
    raise ValueError(
        "alpha for activation noise must have 1 element (layerwise), x.shape[1] elements (per channel, "
        f"dim 1) or shape x.shape[1:] (per feature); got alpha {list(alpha.shape)} for x {list(x.shape)}"
    )


def _check_finite(sigma: Tensor, name: str, alphas: Sequence[Tensor] = ()) -> None:
    """Refuse NaN/Inf in the tensor and in alpha on CPU, where the check costs no device sync (one
    ``.item()`` in the common case); on GPU they propagate. ``alpha * sigma`` must be finite: an infinite
    alpha would turn even a constant tensor (sigma 0) into NaN."""
    if sigma.device.type != "cpu" or torch.compiler.is_compiling() or under_vmap():
        return
    values = [sigma.item()] if sigma.dim() == 0 else sigma.reshape(-1).tolist()  # CPU: no sync
    if not all(map(math.isfinite, values)):
        contract.fail("tensor_finite", name=name)
    for a in alphas:
        a = a.detach()
        finite = all(map(math.isfinite, a.reshape(-1).tolist())) if a.numel() <= 16 else bool(a.isfinite().all())
        contract.require(finite, "alpha_finite")


# Memo of weight_plan: (shape, dtype, device) of every weight and alpha -> (offsets, inners, counters).
_PLANS: dict = {}
_PLANS_MAX = 256


def _memoized(key: tuple, compute):
    """``compute()``, remembered under ``key`` (a raise is never remembered); the memo is bounded."""
    value = _PLANS.get(key)
    if value is None:
        value = compute()
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = value
    return value


def _memo_off(tensors) -> bool:
    """Check without the memo: while dynamo traces (no Python state), or when a non-tensor must get its error."""
    return torch.compiler.is_compiling() or not all(isinstance(t, Tensor) for t in tensors)


def weight_plan(weights: Sequence[Tensor], alphas: Sequence[Tensor]) -> tuple[list[int], list[int], int]:
    """``noisy_weights``' checks of every ``(weights[k], alphas[k])`` and the contract's arguments for
    them: each tensor's counter offset, its ``inner``, and the counters all use together.

    The checks read only each tensor's type, shape, dtype and device, so in eager mode the result is
    memoized by those: a converted model's forward then costs one tuple of metadata instead of ~10 us
    of checks per layer. Bad input is never memoized, so it raises the same error on every call."""
    if _memo_off((*weights, *alphas)):
        return _weight_plan(weights, alphas)
    key = ("plan",) + tuple([(w.shape, w.dtype, w.device, a.shape, a.dtype, a.device) for w, a in zip(weights, alphas)])
    plan = _memoized(key, lambda: _weight_plan(weights, alphas))
    return plan[0].copy(), plan[1].copy(), plan[2]


def checked_weight_inner(weight: Tensor, alpha: Tensor) -> int:
    """``noisy_weight``'s checks of ``(weight, alpha)`` and the contract's ``inner``, memoized like
    :func:`weight_plan` (a per-layer forward runs this on every call)."""
    if _memo_off((weight, alpha)):
        return _checked_weight_inner(weight, alpha)
    key = ("inner", weight.shape, weight.dtype, weight.device, alpha.shape, alpha.dtype, alpha.device)
    return _memoized(key, lambda: _checked_weight_inner(weight, alpha))


def _checked_weight_inner(weight: Tensor, alpha: Tensor) -> int:
    contract.check_tensor("weight", weight)
    _check_alpha(alpha, weight, "weight")
    return _weight_inner(weight, alpha)


def _weight_plan(weights: Sequence[Tensor], alphas: Sequence[Tensor]) -> tuple[list[int], list[int], int]:
    offsets, inners = [], []
    counter = 0
    device = weights[0].device if isinstance(weights[0], Tensor) else None
    for k, (w, a) in enumerate(zip(weights, alphas)):
        contract.check_tensor(f"weights[{k}]", w)
        if w.device != device:
            raise ValueError(f"weights must all be on one device, weights[{k}] is on {w.device}, not {device}")
        _check_alpha(a, w, f"weights[{k}]")
        inners.append(_weight_inner(w, a))
        offsets.append(counter)
        counter += quads(w.numel())
    return offsets, inners, counter


# ---------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------


def _perturb(name: str, t: Tensor, alpha: Tensor, inner: int, seed: Seed, offset, backend: Optional[str]) -> Tensor:
    """The shared tail of noisy_weight / inject_noise once ``alpha``'s layout is known."""
    chosen = backend_for(backend, t.device.type)
    if fast_path.usable(chosen, t, seed):  # one C++ call: sigma, checks, seed, perturb (same results)
        offset = _rng.checked_offset(offset, t.numel())
        seed = _rng.checked_seed(seed)
        return fast_path.noisy(t, alpha, offset, inner, seed, name, _rng.seed_generator())
    rng = _rng.rng_args(seed, offset, t.device, t.numel())
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
    contract.check_tensor("x", x)
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
    chosen = backend_for(backend, device.type)
    if per_tensor:
        offsets = [0] * len(weights)  # each tensor's own key from counter 0
    if fast_path.usable(chosen, weights[0], None if per_tensor else seed) and fast_path.multi_dtype_ok(weights):
        if per_tensor:
            return fast_path.noisy_multi(weights, alphas, offsets, inners, seeds, "weights", None)
        seed = _rng.checked_seed(seed)
        _rng.checked_offset(0, 4 * counter)  # every tensor starts on a fresh counter
        generator = _rng.seed_generator()
        return fast_path.noisy_multi(
            weights, alphas, offsets, inners, None if seed is None else [seed], "weights", generator
        )
    sigmas = weight_sigmas(weights)
    if per_tensor:
        rng = _rng.RngArgs(0, 0, None, None, 0)
    else:
        rng = _rng.rng_args(seed, 0, device, 4 * counter)
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
    rng = _rng.rng_args(seed, offset, like.device, like.numel())
    chosen = backend_for(backend, like.device.type)
    out = call(REGISTRY[chosen].noise, like, rng.seed, rng.offset, state=rng.state)
    rng.advance()
    return out
