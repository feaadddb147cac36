"""The noise calls of every PNI module: leaves for torch.fx, tensor seeds for torch.export.

Every layer's forward draws its noise through :func:`noisy_weight_call` / :func:`noisy_input_call`
(with a fresh seed per call), so graph capture sees one call it can keep random: ``torch.fx``
records them as leaf calls (each module that calls them registers them with ``torch.fx.wrap``),
``torch.export`` gets an RNG-state seed drawn inside the graph. Captures that would freeze one
draw (``torch.jit.trace``, ``torch.jit.script``, ONNX export) are refused here with a hint.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn as nn

from .. import functional as _fn
from .. import rng as _rng
from ..contract import SEED_LIMIT, alpha_dtype_ok

__all__ = ["noisy_weight_call", "noisy_input_call", "refuse_script", "ForwardDraws", "active_draws", "drawn_weight"]


def _alpha_for(alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """alpha as the op takes it for a tensor of ``dtype``: a float32 alpha stays float32 with float16/bfloat16
    activations (AMP keeps parameters fp32, and the alpha gradient is then reduced and returned in fp32, where
    a half-precision gradient would overflow); other mismatches are cast."""
    if alpha_dtype_ok(alpha.dtype, dtype):
        return alpha
    return alpha.to(dtype)


_DEPLOY_HINT = (
    "For a deterministic model use `with pni_fast.no_noise(model): ...` or `pni_fast.strip(model)` "
    "(plain layers, same weights); to keep fresh noise per call use torch.export.export(model, args) "
    "or torch.fx.symbolic_trace(model)."
)


def _refuse_frozen_capture() -> None:
    """jit.trace records tensors, not calls: the noise of the traced call would be replayed forever."""
    if torch.jit.is_tracing():
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError(
                "pni_fast: ONNX export with PNI noise on is not supported (ONNX has no op for "
                "it, and a traced draw would be frozen). " + _DEPLOY_HINT
            )
        raise RuntimeError(
            "pni_fast: torch.jit.trace would freeze PNI's noise into constants (one draw, "
            "replayed on every call). " + _DEPLOY_HINT
        )
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        raise RuntimeError(
            "pni_fast: ONNX export with PNI noise on is not supported (ONNX has no op for PNI's "
            "Philox noise). " + _DEPLOY_HINT
        )


def _graph_seed(t: torch.Tensor) -> Optional[torch.Tensor]:
    """None (a host seed per call), or under torch.export an RNG state ``(seed, 0)`` drawn by a tensor op
    that the exported program runs on every call (``torch.randint`` on torch's generator for the device)."""
    if not torch.compiler.is_exporting():
        return None
    seed = torch.randint(0, SEED_LIMIT - 1, (1,), dtype=torch.int64, device=t.device)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=t.device)])


def noisy_weight_call(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``noisy_weight(weight, alpha)`` with a fresh seed: what every PNI layer's forward calls."""
    _refuse_frozen_capture()
    return _fn.noisy_weight(weight, alpha, seed=_graph_seed(weight))


def noisy_input_call(x: torch.Tensor, alpha: torch.Tensor, layout: int, num_channels: int = 0) -> torch.Tensor:
    """Input noise of a layer with a fresh seed. ``layout``: ``-1`` features last (linear layers), ``n >= 1``
    a conv input with ``n`` spatial dims (channel dim 1, or 0 when unbatched), ``0`` as given
    (``NoiseInjection``; ``num_channels > 0`` checks dim 1)."""
    _refuse_frozen_capture()
    if num_channels and (x.dim() < 2 or x.shape[1] != num_channels):
        raise ValueError(
            f"NoiseInjection(num_channels={num_channels}) expects input [N, {num_channels}, ...], "
            f"got shape {list(x.shape)}"
        )
    alpha = _alpha_for(alpha, x.dtype)
    if layout < 0:
        view = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x  # features last -> dim 1
    elif layout > 0 and x.dim() == layout + 1:
        view = x.unsqueeze(0)  # unbatched conv input [C, *spatial]
    else:
        view = x
    return _fn.inject_noise(view, alpha, seed=_graph_seed(x)).reshape(x.shape)


def refuse_script(module: nn.Module) -> None:
    raise RuntimeError(
        f"pni_fast: torch.jit.script cannot compile {type(module).__name__} (PNI's noise runs in the Python op "
        "layer). Script a plain copy: torch.jit.script(pni_fast.strip(copy.deepcopy(model))), or "
        "torch.jit.trace the model inside `with pni_fast.no_noise(model):`; torch.export.export keeps the noise."
    )


# ---------------------------------------------------------------------------
# Weight noise drawn ahead for a whole forward (pni_fast.nn.batching)
# ---------------------------------------------------------------------------


class ForwardDraws:
    """The weight noise one forward of a batched model drew ahead, in one multi-tensor call.

    ``entries`` maps a layer to ``(seed, noisy weight)``: ``seed`` is the value the layer's own
    :func:`~pni_fast.rng.draw_seed` is predicted to return at its call, and the noisy weight is
    ``noisy_weight(weight, alpha, seed=seed)`` bit for bit. It lives on a per-thread stack for the
    duration of that forward only, never on a module, so threads, re-entrant calls and recomputes
    cannot see each other's draws.
    """

    __slots__ = ("owner", "entries", "grad_enabled")

    def __init__(self, owner: object, entries: dict, grad_enabled: bool) -> None:
        self.owner = owner
        self.entries = entries
        self.grad_enabled = grad_enabled


_local = threading.local()


def active_draws() -> list[ForwardDraws]:
    """This thread's stack of forwards with pre-drawn weights (empty outside a batched forward)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def drawn_weight(layer: nn.Module, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """A layer's noisy weight inside a batched forward: the layer draws its seed as an unbatched layer
    would, and takes the pre-drawn tensor only when the prediction was right, so the numbers never
    depend on batching. A recompute (activation checkpointing restores torch's generator) draws the same
    seed and recomputes the same bits with a per-layer call."""
    _refuse_frozen_capture()
    seed = _rng.draw_seed()  # through the module: a spy on rng.draw_seed sees every host draw
    for draws in reversed(active_draws()):
        entry = draws.entries.get(layer)
        if entry is None or entry[0] != seed:
            continue
        if torch.is_grad_enabled() and not draws.grad_enabled:
            break  # drawn without a graph: alpha needs one now
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            break  # saved-tensor hooks (non-reentrant checkpoint): do what the recompute will do
        return entry[1]
    return _fn.noisy_weight(weight, alpha, seed=seed)
