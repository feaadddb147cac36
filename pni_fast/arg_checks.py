"""Argument checks of the public functions, and alpha's shape read as the op contract's ``inner``.

The ops take ``inner`` (how many consecutive elements share one alpha value, docs/design.md
section 1); the public functions take an alpha whose shape names the PNI mode. This file turns
one into the other and refuses, with the argument's name, what fits no mode or dtype. It also
holds the CPU finite check of sigma and alpha, which needs no device sync there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import op_checks
from .ops_torch import check_alpha_dtype
from .rng import under_vmap

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_alpha(alpha, ref: Tensor, ref_name: str) -> None:
    if not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a torch.Tensor, got {type(alpha).__name__}")
    if alpha.device != ref.device:
        raise ValueError(f"alpha must be on {ref_name}'s device {ref.device}, got {alpha.device}")
    check_alpha_dtype(alpha, ref.dtype, ref_name)
    # a zero-size tensor (a layer with 0 output channels) takes the zero-size alpha of its layer's shape
    op_checks.require(alpha.numel() > 0 or ref.numel() == 0, "alpha_empty", vname=ref_name, alpha_shape=alpha.shape)


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
        op_checks.require(False, "tensor_finite", name=name)
    for a in alphas:
        a = a.detach()
        finite = all(map(math.isfinite, a.reshape(-1).tolist())) if a.numel() <= 16 else bool(a.isfinite().all())
        op_checks.require(finite, "alpha_finite")


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
    _check_tensor("weight", weight)
    _check_alpha(alpha, weight, "weight")
    return _weight_inner(weight, alpha)


def _weight_plan(weights: Sequence[Tensor], alphas: Sequence[Tensor]) -> tuple[list[int], list[int], int]:
    offsets, inners = [], []
    counter = 0
    device = weights[0].device if isinstance(weights[0], Tensor) else None
    for k, (w, a) in enumerate(zip(weights, alphas)):
        _check_tensor(f"weights[{k}]", w)
        if w.device != device:
            raise ValueError(f"weights must all be on one device, weights[{k}] is on {w.device}, not {device}")
        _check_alpha(a, w, f"weights[{k}]")
        inners.append(_weight_inner(w, a))
        offsets.append(counter)
        counter += -(-w.numel() // 4)
    return offsets, inners, counter
