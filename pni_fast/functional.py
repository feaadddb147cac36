"""The public PNI functions: ``w' = w + alpha * std(w) * z`` in one fused pass, differentiable.

This layer validates arguments, computes ``sigma`` on the device (no ``.item()`` on GPU),
chooses the seed source (:mod:`pni_fast.rng`) and the backend (:mod:`pni_fast.backends`),
and calls the backend's op through the autograd functions of :mod:`pni_fast.autograd`.
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

import importlib
import math
import operator
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from . import (
    _ext,
    backends,
    fused,
    op_checks,
    ops_torch,  # noqa: F401  (registers the pure-PyTorch ops)
)
from . import rng as _rng
from .autograd import PerturbFn, PerturbMultiFn, apply, call, register_op_autograd
from .backends import REGISTRY
from .ops_torch import check_alpha_dtype, opmath
from .rng import SEED_LIMIT, default_rng_state, draw_seed, make_rng_state, rng_args, under_vmap

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
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
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

    def perturb_multi(vs, alphas, sigmas, seed, offsets, inners, rng_state=None):
        op_checks.check_perturb_multi("perturb_multi", "v", vs, alphas, sigmas, seed, offsets, inners, rng_state)
        return [v.new_empty(v.shape) for v in vs]

    def alpha_grad_multi(grads, alphas, sigmas, seed, offsets, inners, rng_state=None):
        op_checks.check_perturb_multi(
            "perturb_alpha_grad_multi", "grad", grads, alphas, sigmas, seed, offsets, inners, rng_state
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


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


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
    if alpha.numel() == 0:
        raise ValueError("alpha must have at least one element, got an empty tensor")


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


# ---------------------------------------------------------------------------
# sigma: one definition per (device, dtype), whichever backend is loaded
# ---------------------------------------------------------------------------


def _std_scaled(t: Tensor) -> Tensor:
    """Unbiased std of a float64 tensor whose squares may overflow: scale by max|t - mean| first."""
    m = t.mean()
    d = t - m
    scale = d.abs().amax()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (d / safe).std() * safe


def _sigma_torch(t: Tensor) -> Tensor:
    """The pure-PyTorch sigma. CPU: float64 two-pass, rounded once (the C++ ``sigma`` op's definition)."""
    if t.device.type == "cpu" or t.dtype == torch.float64:
        d = t.to(torch.float64)
        if t.dtype == torch.float64:
            s = d.std()
            if (
                t.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and not under_vmap()
                and not math.isfinite(float(s))
            ):
                s = _std_scaled(d)  # finite tensors whose squares overflow float64
            return s
        m = d.mean()
        return torch.sqrt(((d - m) ** 2).sum() / (d.numel() - 1)).to(torch.float32)
    return t.to(torch.float32).std()


def weight_sigma(t: Tensor) -> Tensor:
    """Detached unbiased ``std`` as a 0-d tensor on ``t``'s device (float32, float64 for float64).

    A tensor with fewer than 2 elements has no spread: sigma is 0 and the op returns it unchanged.
    On CPU, float16/bfloat16/float32 sigma is the float64 two-pass std rounded once to float32 on every
    backend (so the first call in a process equals later ones); float64 sigma is ``torch.std``.
    """
    t = t.detach()
    if t.numel() < 2:
        return torch.zeros((), dtype=opmath(t.dtype), device=t.device)
    if t.device.type == "cpu" and t.dtype != torch.float64 and not under_vmap() and _cpp_sigma_available():
        return torch.ops.pni_fast.sigma(t)  # the same definition in one fused pass
    return _sigma_torch(t)


def weight_sigmas(ts: Sequence[Tensor]) -> list[Tensor]:
    """:func:`weight_sigma` of many tensors, bit-identical per tensor; on CPU one ``sigma_multi`` call per dtype
    (one pass over all of them) instead of a call per tensor."""
    ts = list(ts)
    for k, t in enumerate(ts):
        _check_tensor(f"ts[{k}]", t)
    ts = [t.detach() for t in ts]
    if not ts or ts[0].device.type != "cpu" or under_vmap() or not _cpp_sigma_multi_available():
        return [weight_sigma(t) for t in ts]
    out: list[Optional[Tensor]] = [None] * len(ts)
    groups: dict[torch.dtype, list[int]] = {}
    for k, t in enumerate(ts):
        if t.dtype == torch.float64 or t.numel() < 2:
            out[k] = weight_sigma(t)
        else:
            groups.setdefault(t.dtype, []).append(k)
    for idx in groups.values():
        for k, s in zip(idx, torch.ops.pni_fast.sigma_multi([ts[k] for k in idx]).unbind(0)):
            out[k] = s
    return out  # type: ignore[return-value]


@_trace_constant
def _cpp_sigma_multi_available() -> bool:
    return _ext.load() and _ext.has_op("sigma_multi", "cpu")


@_trace_constant
def _cpp_sigma_available() -> bool:
    """The compiled library (loaded now if it can be) has pni_fast::sigma: a trace-time constant."""
    return _ext.load() and _ext.has_op("sigma", "cpu")


def _check_finite(sigma: Tensor, name: str, alphas: Sequence[Tensor] = ()) -> None:
    """Refuse NaN/Inf in the tensor and in alpha on CPU, where the check costs no device sync (one
    ``.item()`` in the common case); on GPU they propagate. ``alpha * sigma`` must be finite: an infinite
    alpha would turn even a constant tensor (sigma 0) into NaN."""
    if sigma.device.type != "cpu" or torch.compiler.is_compiling() or under_vmap():
        return
    values = [sigma.item()] if sigma.dim() == 0 else sigma.reshape(-1).tolist()  # CPU: no sync
    if not all(map(math.isfinite, values)):
        raise ValueError(
            f"{name} contains NaN or Inf, so its std (PNI's noise scale) is not finite; "
            "fix the tensor before injecting noise"
        )
    for a in alphas:
        a = a.detach()
        finite = all(map(math.isfinite, a.reshape(-1).tolist())) if a.numel() <= 16 else bool(a.isfinite().all())
        if not finite:
            raise ValueError("alpha must be finite (PNI's noise scale), got NaN or Inf")


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


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
    _check_tensor("weight", weight)
    _check_alpha(alpha, weight, "weight")
    return _perturb("weight", weight, alpha, _weight_inner(weight, alpha), seed, offset, backend)


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
    seed: Seed = None,
    backend: Optional[str] = None,
) -> list[Tensor]:
    """:func:`noisy_weight` for many tensors at once (one launch where the backend supports it).

    Tensor ``k`` uses the counters after those of tensors ``0..k-1`` under one seed, so the
    result equals calling :func:`noisy_weight` per tensor with those offsets.
    """
    weights, alphas = list(weights), list(alphas)
    if len(weights) != len(alphas):
        raise ValueError(f"weights and alphas must have the same length, got {len(weights)} and {len(alphas)}")
    if not weights:
        return []
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
        counter += _quads(w.numel())
    chosen = _backend_for(backend, device.type)
    if fused.usable(chosen, weights[0], seed) and fused.multi_dtype_ok(weights):
        seed = _rng.checked_seed(seed)
        _rng.checked_offset(0, counter)
        return fused.noisy_multi(weights, alphas, offsets, inners, seed, "weights", _rng.seed_generator())
    sigmas = weight_sigmas(weights)
    rng = rng_args(seed, 0, device, counter)
    _check_finite(torch.stack(sigmas), "weights", alphas)
    multi = REGISTRY[chosen].perturb_multi
    if multi is None:
        outs = [
            apply(PerturbFn, w, a, s, rng.seed, o, i, rng.state, chosen)
            for w, a, s, o, i in zip(weights, alphas, sigmas, offsets, inners)
        ]
    elif torch.compiler.is_compiling():  # dynamo traces the op's registered autograd, not the flattened Function
        outs = list(
            call(
                multi,
                [w.contiguous() for w in weights],
                [a.contiguous() for a in alphas],
                sigmas,
                rng.seed,
                offsets,
                inners,
                state=rng.state,
            )
        )
    else:
        outs = list(
            apply(
                PerturbMultiFn, len(weights), rng.seed, offsets, inners, rng.state, chosen, *weights, *alphas, *sigmas
            )
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
