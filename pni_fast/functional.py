"""The fused PNI ops as differentiable functions: ``w' = w + alpha * std(w) * z``.

Every backend is a PyTorch custom op that is a pure function of ``(tensor, alpha, sigma,
seed, offset, inner)``; this module validates arguments, computes ``sigma`` on the
device (no ``.item()``), picks the backend, and registers fake kernels and autograd.
The backward never stores the noise: it regenerates ``z`` from ``(seed, offset)``.

Seeds: when ``seed`` is None a fresh one is drawn from PyTorch's default CPU generator
(``torch.manual_seed`` makes a run reproducible; this advances that generator and never
touches the GPU). Under ``torch.compile(fullgraph=True)`` a drawn seed traces as a symbolic
integer (the ops take ``SymInt seed``): no graph break. Inductor replays the draw with its own
random stream, so compiled noise is fresh per call but not bit-equal to eager's for the same
``torch.manual_seed``; ``aot_eager`` and explicit seeds match eager exactly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _ext, backends
from .reference import alpha_view, randn_torch, philox_words_torch, uniform_from_words_torch

__all__ = [
    "noisy_weight",
    "inject_noise",
    "noisy_weights",
    "randn",
    "draw_seed",
    "weight_sigma",
    "SEED_LIMIT",
]

SEED_LIMIT = 2**63
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# The pure-PyTorch backend, registered with the same signatures as the C++ ops
# ---------------------------------------------------------------------------


@torch.library.custom_op("pni_fast::noise_torch", mutates_args=())
def _noise_torch(like: Tensor, seed: int, offset: int) -> Tensor:
    return randn_torch(like.numel(), seed, offset, like.device).reshape(like.shape)


@_noise_torch.register_fake
def _(like: Tensor, seed: int, offset: int) -> Tensor:
    return like.new_empty(like.shape, dtype=torch.float32)


@torch.library.custom_op("pni_fast::rng_words_torch", mutates_args=())
def _rng_words_torch(like: Tensor, seed: int, offset: int) -> Tensor:
    w = philox_words_torch(like.numel(), seed, offset, like.device)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


@torch.library.custom_op("pni_fast::rng_uniform_torch", mutates_args=())
def _rng_uniform_torch(like: Tensor, seed: int, offset: int) -> Tensor:
    return uniform_from_words_torch(philox_words_torch(like.numel(), seed, offset, like.device))


@torch.library.custom_op("pni_fast::perturb_torch", mutates_args=())
def _perturb_torch(v: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int) -> Tensor:
    om = _opmath(v.dtype)
    shape, a = alpha_view(alpha.to(om), v.numel(), inner)
    z = randn_torch(v.numel(), seed, offset, v.device).to(om).reshape(shape)
    out = v.to(om).reshape(shape) + (a * sigma.to(om)) * z
    return out.to(v.dtype).reshape(v.shape)


@_perturb_torch.register_fake
def _(v: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int) -> Tensor:
    return v.new_empty(v.shape)


@torch.library.custom_op("pni_fast::perturb_alpha_grad_torch", mutates_args=())
def _perturb_alpha_grad_torch(
    grad: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int
) -> Tensor:
    om = _opmath(grad.dtype)
    shape, _ = alpha_view(alpha, grad.numel(), inner)
    z = randn_torch(grad.numel(), seed, offset, grad.device).to(om).reshape(shape)
    partial = (grad.to(om).reshape(shape) * z).sum(dim=(0, 2))
    return (partial * sigma.to(om)).reshape(alpha.shape).to(alpha.dtype)


@_perturb_alpha_grad_torch.register_fake
def _(grad: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int) -> Tensor:
    return alpha.new_empty(alpha.shape)


# ---------------------------------------------------------------------------
# Backend table, fake kernels for the C++ ops, autograd for every forward op
# ---------------------------------------------------------------------------

_OPS = {
    # backend: (noise, perturb, alpha grad, perturb multi or None, alpha grad multi or None)
    "cpu": ("noise", "perturb", "perturb_alpha_grad", "perturb_multi", "perturb_alpha_grad_multi"),
    "cuda": ("noise", "perturb", "perturb_alpha_grad", "perturb_multi", "perturb_alpha_grad_multi"),
    "triton": (
        "noise_triton",
        "perturb_triton",
        "perturb_alpha_grad_triton",
        "perturb_multi_triton",
        "perturb_alpha_grad_multi_triton",
    ),
    "torch": ("noise_torch", "perturb_torch", "perturb_alpha_grad_torch", None, None),
}
_registered: set[str] = set()


def _op(name: str):
    return getattr(torch.ops.pni_fast, name).default


def _setup_single(ctx, inputs, output) -> None:
    _, alpha, sigma, seed, offset, inner = inputs
    ctx.save_for_backward(alpha, sigma)
    ctx.rng = (seed, offset, inner)


def _setup_multi(ctx, inputs, output) -> None:
    _, alphas, sigmas, seed, offsets, inners = inputs
    ctx.save_for_backward(*alphas, *sigmas)
    ctx.rng = (seed, list(offsets), list(inners))
    ctx.shapes = [(a.shape, a.dtype, a.device) for a in inputs[0]]


def _single_backward(grad_op_name: str):
    def backward(ctx, grad: Tensor):
        alpha, sigma = ctx.saved_tensors
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = _op(grad_op_name)(grad.contiguous(), alpha, sigma, *ctx.rng)
        return grad, grad_alpha, None, None, None, None

    return backward


def _multi_backward(grad_op_name: str):
    def backward(ctx, grads: Sequence[Optional[Tensor]]):
        saved = ctx.saved_tensors
        n = len(saved) // 2
        alphas, sigmas = list(saved[:n]), list(saved[n:])
        grads = [
            torch.zeros(s, dtype=d, device=dev) if g is None else g.contiguous()
            for g, (s, d, dev) in zip(grads, ctx.shapes)
        ]
        seed, offsets, inners = ctx.rng
        grad_alphas = _op(grad_op_name)(grads, alphas, sigmas, seed, offsets, inners)
        return grads, list(grad_alphas), [None] * n, None, None, None

    return backward


def _register_cpp_fakes() -> None:
    @torch.library.register_fake("pni_fast::noise")
    def _(like, seed, offset):
        return like.new_empty(like.shape, dtype=torch.float32)

    @torch.library.register_fake("pni_fast::rng_words")
    def _(like, seed, offset):
        return like.new_empty((4 * (-(-like.numel() // 4)),), dtype=torch.int32)

    @torch.library.register_fake("pni_fast::rng_uniform")
    def _(like, seed, offset):
        return like.new_empty((4 * (-(-like.numel() // 4)),), dtype=torch.float32)

    @torch.library.register_fake("pni_fast::perturb")
    def _(v, alpha, sigma, seed, offset, inner):
        return v.new_empty(v.shape)

    @torch.library.register_fake("pni_fast::perturb_alpha_grad")
    def _(grad, alpha, sigma, seed, offset, inner):
        return alpha.new_empty(alpha.shape)

    @torch.library.register_fake("pni_fast::perturb_multi")
    def _(vs, alphas, sigmas, seed, offsets, inners):
        return [v.new_empty(v.shape) for v in vs]

    @torch.library.register_fake("pni_fast::perturb_alpha_grad_multi")
    def _(grads, alphas, sigmas, seed, offsets, inners):
        return [a.new_empty(a.shape) for a in alphas]


def _ensure_registered(backend: str) -> None:
    """Attach fake kernels (C++ ops) and autograd to a backend's ops, once."""
    group = "cpp" if backend in ("cpu", "cuda") else backend
    if group in _registered:
        return
    if group == "cpp":
        _register_cpp_fakes()
    elif group == "triton":
        from . import triton as _triton_ops  # noqa: F401  (registers the triton_ops)
    _, fwd, bwd, fwd_multi, bwd_multi = _OPS[backend]
    # the compiled library brings the same autograd in C++ (csrc/autograd.cpp): keep it, it
    # saves ~20 us of Python per forward + backward
    cpp_autograd = group == "cpp" and torch._C._dispatch_has_kernel_for_dispatch_key(f"pni_fast::{fwd}", "Autograd")
    if not cpp_autograd:
        torch.library.register_autograd(f"pni_fast::{fwd}", _single_backward(bwd), setup_context=_setup_single)
        if fwd_multi is not None:
            torch.library.register_autograd(
                f"pni_fast::{fwd_multi}", _multi_backward(bwd_multi), setup_context=_setup_multi
            )
    _registered.add(group)


_ensure_registered("torch")


@torch.compiler.assume_constant_result
def _backend_for(name: Optional[str], device_type: str) -> str:
    """Resolve and prepare the backend; a trace-time constant under torch.compile."""
    chosen = backends.resolve_backend(name, device_type)
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
    if alpha.dtype != ref.dtype:
        raise TypeError(f"alpha must have {ref_name}'s dtype {ref.dtype}, got {alpha.dtype}")
    if alpha.numel() == 0:
        raise ValueError("alpha must have at least one element, got an empty tensor")


def _check_seed_offset(seed, offset) -> int:
    if seed is None:
        seed = draw_seed()
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**63) or None, got {type(seed).__name__}")
    elif not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be a non-negative int, got {type(offset).__name__}")
    if not 0 <= offset < SEED_LIMIT:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")
    return seed


def _weight_inner(weight: Tensor, alpha: Tensor) -> int:
    """The contract's ``inner`` for a weight's alpha, inferred from alpha's shape."""
    if alpha.numel() == 1:
        return 1
    if tuple(alpha.shape) == tuple(weight.shape):
        return 1
    out = weight.shape[0] if weight.dim() > 0 else 1
    channel_shapes = {(out,) + (1,) * k for k in range(weight.dim())}
    if tuple(alpha.shape) in channel_shapes:
        return weight.numel() // out
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
            inner = 1
            for s in x.shape[2:]:
                inner *= s
            return max(inner, 1)
    raise ValueError(
        "alpha for activation noise must have 1 element (layerwise), x.shape[1] elements (per channel, "
        f"dim 1) or shape x.shape[1:] (per feature); got alpha {list(alpha.shape)} for x {list(x.shape)}"
    )


def weight_sigma(t: Tensor) -> Tensor:
    """Detached unbiased ``std`` as a 0-d tensor on ``t``'s device (float32, float64 for float64).

    A tensor with fewer than 2 elements has no spread: sigma is 0 and the op returns it unchanged.
    """
    t = t.detach()
    om = _opmath(t.dtype)
    if t.numel() < 2:
        return torch.zeros((), dtype=om, device=t.device)
    if t.device.type == "cpu" and _cpp_sigma_loaded():
        return torch.ops.pni_fast.sigma(t)  # same definition, one fused pass (~4x faster than std)
    return t.to(om).std()


@torch.compiler.assume_constant_result
def _cpp_sigma_loaded() -> bool:
    """The compiled library is already loaded and has pni_fast::sigma (a trace-time constant)."""
    return _ext.is_loaded() and _ext.has_op("sigma", "cpu")


def _check_finite(sigma: Tensor, name: str) -> None:
    """Refuse NaN/Inf on CPU, where the check costs no device sync; on GPU they propagate."""
    if sigma.device.type == "cpu" and not torch.compiler.is_compiling():
        values = [sigma.item()] if sigma.dim() == 0 else sigma.reshape(-1).tolist()  # CPU: no sync
        if not all(map(math.isfinite, values)):
            raise ValueError(
                f"{name} contains NaN or Inf, so its std (PNI's noise scale) is not finite; "
                "fix the tensor before injecting noise"
            )


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def draw_seed() -> int:
    """A seed in [0, 2**63) from PyTorch's default CPU generator (advances it; no GPU sync)."""
    return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())


def _perturb(
    name: str, t: Tensor, alpha: Tensor, inner: int, seed: Optional[int], offset: int, backend: Optional[str]
) -> Tensor:
    """The shared tail of noisy_weight / inject_noise once ``alpha``'s layout is known."""
    seed = _check_seed_offset(seed, offset)
    sigma = weight_sigma(t)
    _check_finite(sigma, name)
    chosen = _backend_for(backend, t.device.type)
    return _op(_OPS[chosen][1])(t.contiguous(), alpha.contiguous(), sigma, seed, offset, inner)


def noisy_weight(
    weight: Tensor,
    alpha: Tensor,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
    backend: Optional[str] = None,
) -> Tensor:
    """PNI-W: ``weight + alpha * std(weight) * z`` in one fused pass; differentiable in both.

    Args:
        weight: a floating tensor (any shape; a conv weight is ``[O, I, kh, kw]``).
        alpha: 1 element (layerwise), ``[O, 1, ...]`` (channelwise) or ``weight.shape``
            (elementwise); same dtype and device as ``weight``.
        seed: Philox seed in [0, 2**63); None draws one from torch's default CPU generator.
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
    seed: Optional[int] = None,
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
    seed: Optional[int] = None,
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
    offsets, inners, sigmas = [], [], []
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
        sigmas.append(weight_sigma(w))
    seed = _check_seed_offset(seed, 0)
    _check_finite(torch.stack(sigmas), "weights")
    chosen = _backend_for(backend, device.type)
    weights = [w.contiguous() for w in weights]
    alphas = [a.contiguous() for a in alphas]
    multi = _OPS[chosen][3]
    if multi is None:
        fwd = _op(_OPS[chosen][1])
        return [fwd(w, a, s, seed, o, i) for w, a, s, o, i in zip(weights, alphas, sigmas, offsets, inners)]
    return list(_op(multi)(weights, alphas, sigmas, seed, offsets, inners))


def randn(
    shape: Sequence[int] | torch.Size,
    *,
    seed: int,
    offset: int = 0,
    device: torch.device | str | None = None,
    backend: Optional[str] = None,
) -> Tensor:
    """The noise ``z`` the fused ops use for ``(seed, offset)``: float32 of ``shape``."""
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {list(shape)}")
    seed = _check_seed_offset(seed, offset)
    like = torch.empty(shape, device=device)
    chosen = _backend_for(backend, like.device.type)
    return _op(_OPS[chosen][0])(like, seed, offset)
