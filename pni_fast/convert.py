"""Turn any model into a PNI model in place (``convert``) and back (``strip``).

Plain ``nn.Conv2d``/``nn.Linear`` layers are replaced by ``NoisyConv2d``/``NoisyLinear`` holding the
*same* ``Parameter`` objects for ``weight`` and ``bias`` (no copy: an optimizer or another reference to
them stays valid; only the new alphas need adding to an optimizer built before the conversion), plus
device, dtype, training mode and forward/backward hooks. Every other layer of the conv/linear families
(``Conv1d``, ``Conv3d``, ``ConvTranspose1d/2d/3d``, subclasses with their own ``forward``, parametrized
or pruned layers) is converted in place and keeps its own ``forward`` (:mod:`pni_fast.wrap`): a
layer's math never changes, only its weight gets noise. What cannot be converted is listed with the
reason (``report=True`` / ``verbose=True``) and, when the layer would have been converted, warned
about. A module shared in several places is converted once and stays shared.

This file is the model walk (what to do with each layer, the report); building one layer's twin
is :mod:`pni_fast.layer_twins`, the whole-model noise hooks ``convert`` installs are
:mod:`pni_fast.batching`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .batching import batch_weight_noise, remove_batching
from .layer_twins import _swap, noisy_from, plain_from
from .modules import (
    NoiseInjection,
    NoisyConv2d,
    NoisyLinear,
    _PNIMixin,
    check_alpha_init,
    check_noise,
    check_pni,
    is_noisy_module,
)
from .wrap import is_wrapped, plain_class, unwrap_layer, wrap_layer

__all__ = ["convert", "strip", "noisy_from", "plain_from", "ConvertReport", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)
"""Layer families ``convert`` handles: ``nn.Linear`` and every ``nn.Conv*d``/``nn.ConvTranspose*d``, with subclasses."""

SkipSpec = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _check_flags(**flags: Any) -> None:
    """Refuse a non-bool flag (``batch_noise="no"`` is truthy: it would install batching), naming it."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"convert: {name} must be True or False, got {value!r} ({type(value).__name__})")


def _skip_predicate(skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    """``skip`` as a predicate on (qualified name, module).

    Strings match a module's qualified name exactly or as a dotted prefix (``"layer1"`` skips
    everything inside ``layer1``).
    """
    if skip is None:
        return lambda name, m: False
    if callable(skip) and not isinstance(skip, nn.Module):
        return skip  # type: ignore[return-value]
    names = [skip] if isinstance(skip, str) else list(skip)  # type: ignore[arg-type]
    for s in names:
        if not isinstance(s, str):
            raise TypeError(
                f"skip must be a name, an iterable of names or a callable(name, module), got an element {s!r}"
            )
    pattern = [re.compile(re.escape(s) + r"(\..*)?") for s in names]
    return lambda name, m: any(p.fullmatch(name) for p in pattern)


def _check_layers(layers: Any) -> tuple[type, ...]:
    if layers is None:
        return SUPPORTED_LAYERS
    if isinstance(layers, type):
        layers = (layers,)
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one layer type (e.g. nn.Conv2d and/or nn.Linear)")
    for t in layers:
        if not isinstance(t, type) or not issubclass(t, SUPPORTED_LAYERS):
            raise TypeError(
                "layers may contain only nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or their "
                f"subclasses, got {t!r}"
            )
    return layers


@dataclass
class ConvertReport:
    """What ``convert(..., report=True)`` did. ``converted`` and ``skipped`` hold
    ``(qualified name, class name, how or why)``; ``model`` is the converted model."""

    model: nn.Module
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pni_fast.convert: {len(self.converted)} layer(s) converted, {len(self.skipped)} left as they are"]
        lines += [f"  converted {n or '<model>'} ({c}): {how}" for n, c, how in self.converted]
        lines += [f"  skipped   {n or '<model>'} ({c}): {why}" for n, c, why in self.skipped]
        return "\n".join(lines)


_MHA_REASON = (
    "nn.MultiheadAttention reads in_proj_weight (a bare Parameter) and out_proj.weight directly in "
    "F.multi_head_attention_forward, so no layer forward carries the noise; not supported"
)


def _bare_weights(m: nn.Module) -> list[str]:
    return [n for n, p in m._parameters.items() if p is not None and n.endswith("weight") and p.dim() >= 2]


def _plan(
    name: str, m: nn.Module, parent: Optional[nn.Module], layers: tuple[type, ...], user_skip: bool
) -> Optional[tuple[str, str]]:
    """("replace" | "wrap" | "skip" | "warn" | "lazy", detail) for one module, or None (not a layer to report)."""
    if is_noisy_module(m):
        return ("skip", "already a PNI layer") if isinstance(m, layers) else None
    if isinstance(m, nn.MultiheadAttention):
        linear_asked = any(issubclass(nn.modules.linear.NonDynamicallyQuantizableLinear, t) for t in layers)
        return ("warn", _MHA_REASON) if linear_asked and not user_skip else None
    if not isinstance(m, SUPPORTED_LAYERS):
        bare = _bare_weights(m)
        if bare and not isinstance(m, NoiseInjection):
            return (
                "skip",
                f"unsupported layer type: no noise on {', '.join(bare)} (convert handles nn.Linear, "
                "nn.Conv*d, nn.ConvTranspose*d and subclasses)",
            )
        return None
    if not isinstance(m, layers):
        return None
    if user_skip:
        return ("skip", "skip= names it")
    if "alpha_w" in m._parameters or "alpha_i" in m._parameters:
        return ("skip", "already has a PNI alpha (alpha_w/alpha_i): a PNI layer from elsewhere")
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "warn",
            f"its parent {type(parent).__name__} (an nn.MultiheadAttention) reads this layer's weight "
            "directly; the layer's own forward never runs, so noise there would have no effect",
        )
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return ("lazy", "")
    if not isinstance(getattr(m, "weight", None), torch.Tensor):
        return ("warn", "has no weight tensor")
    plain = (
        type(m) in (nn.Conv2d, nn.Linear)
        and isinstance(m._parameters.get("weight"), nn.Parameter)
        and "weight" not in m.__dict__
        and not parametrize.is_parametrized(m)
    )
    if plain:
        return ("replace", f"replaced by {'NoisyConv2d' if isinstance(m, nn.Conv2d) else 'NoisyLinear'}")
    return ("wrap", f"wrapped in place as Noisy{type(m).__name__} (its own forward, noisy weight)")


def convert(
    model: nn.Module,
    pni: str = "layerwise",
    noise: str = "weight",
    layers: Any = None,
    skip: SkipSpec = None,
    alpha_init: float = 0.25,
    *,
    report: bool = False,
    verbose: bool = False,
    batch_noise: bool = True,
) -> Union[nn.Module, ConvertReport]:
    """Give every matching layer of ``model`` PNI noise, in place; returns ``model``.

    Args:
        pni, noise, alpha_init: as for ``NoisyConv2d`` / ``NoisyLinear``.
        layers: layer types to convert, with their subclasses (default: nn.Linear and every
            nn.Conv*d / nn.ConvTranspose*d). Plain nn.Conv2d/nn.Linear become NoisyConv2d/NoisyLinear;
            any other matching layer keeps its class and forward and gets a noisy weight
            (:mod:`pni_fast.wrap`).
        skip: qualified module names (exact or dotted prefix) or a callable ``(name, module) -> bool``
            selecting layers to leave plain (e.g. ``skip="fc"``). A shared module is skipped when
            any of its names is.
        report: return a :class:`ConvertReport` (converted layers; skipped ones with the reason)
            instead of the model (the model is its ``.model``).
        verbose: print that report.
        batch_noise: draw the whole model's weight noise in one multi-tensor call per forward (and one
            alpha-gradient call per backward) with :func:`pni_fast.batch_weight_noise`, installed on the
            returned model (default). False keeps one call per layer; ``strip`` removes it either way.
    Weights are not copied. An uninitialised lazy layer is refused (ValueError, nothing changed):
    run one forward pass first. Layers that match but cannot carry noise (nn.MultiheadAttention's
    projections) are skipped with a warning; already noisy layers are left alone. Warns when no
    layer was converted. If ``model`` itself is a matching plain layer, the new layer is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_flags(report=report, verbose=verbose, batch_noise=batch_noise)
    check_pni(pni)
    check_noise(noise)
    check_alpha_init(alpha_init)
    layers = _check_layers(layers)
    skipped = _skip_predicate(skip)

    names: dict[int, list[str]] = {}
    parents: dict[int, nn.Module] = {}
    modules: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
        modules[id(m)] = m
        for child in m._modules.values():
            if child is not None:
                parents.setdefault(id(child), m)
    out = ConvertReport(model)
    plans: list[tuple[nn.Module, str, str, str]] = []
    lazy: list[str] = []
    for key, m in modules.items():
        name = names[key][0]
        plan = _plan(name, m, parents.get(key), layers, any(skipped(n, m) for n in names[key]))
        if plan is None:
            continue
        if plan[0] == "lazy":
            lazy.append(f"{name or '<model>'} ({type(m).__name__})")
        plans.append((m, name, *plan))
    if lazy:
        raise ValueError(
            f"convert: uninitialised lazy layer(s) {', '.join(lazy)}: their weight shape is not known "
            "yet; run one forward pass first (they then become ordinary layers) and convert after that"
        )
    replace: dict[int, nn.Module] = {}
    warned: list[str] = []
    for m, name, action, detail in plans:
        if action == "replace":
            replace[id(m)] = noisy_from(m, pni=pni, noise=noise, alpha_init=alpha_init)
        elif action == "wrap":
            wrap_layer(m, pni, noise, alpha_init)
        if action in ("replace", "wrap"):
            out.converted.append(
                (name, type(m).__name__ if action == "replace" else m._pni_base_class.__name__, detail)
            )
            if isinstance(parents.get(id(m)), nn.TransformerEncoderLayer) and torch.backends.mha.get_fastpath_enabled():
                warned.append(
                    f"{name} is converted, but nn.TransformerEncoderLayer's inference fast path (eval "
                    "mode without autograd) reads its weights directly and skips the noise; call "
                    "torch.backends.mha.set_fastpath_enabled(False)"
                )
        else:
            out.skipped.append((name, type(m).__name__, detail))
            if action == "warn":
                warned.append(f"{name or '<model>'} ({type(m).__name__}): {detail}")
    if warned:
        warnings.warn("convert: left without noise: " + "; ".join(warned), stacklevel=2)
    if not out.converted and not warned:
        kinds = (
            "Linear, Conv*d, ConvTranspose*d" if layers == SUPPORTED_LAYERS else ", ".join(t.__name__ for t in layers)
        )
        warnings.warn(
            f"convert: no layer of type {kinds} was converted in "
            f"{type(model).__name__} (none matched, all skipped, or already noisy)",
            stacklevel=2,
        )
    out.model = _swap(model, replace) if replace else model
    if batch_noise:
        batch_weight_noise(out.model, warn=False)
    if verbose:
        print(out)
    return out if report else out.model


def strip(model: nn.Module) -> nn.Module:
    """Undo ``convert`` in place: ``NoisyConv2d``/``NoisyLinear`` become plain ``nn.Conv2d``/``nn.Linear``
    holding the same weight/bias Parameters, layers converted in place get their class back, alphas
    are dropped and ``NoiseInjection`` becomes ``nn.Identity``. A parametrization added to a PNI layer
    after ``convert`` stays on the plain layer.

    Returns ``model`` (or the plain layer when ``model`` itself is a PNI layer). Warns when
    ``model`` has no PNI module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    remove_batching(model)
    replace: dict[int, nn.Module] = {}
    in_place: dict[int, nn.Module] = {}
    for m in model.modules():
        if id(m) in replace or id(m) in in_place:
            continue
        if is_wrapped(m) or (isinstance(m, _PNIMixin) and type(m) not in (NoisyConv2d, NoisyLinear)):
            in_place[id(m)] = m  # converted in place, or a parametrized NoisyConv2d/NoisyLinear
        elif isinstance(m, (NoisyConv2d, NoisyLinear, NoiseInjection)):
            replace[id(m)] = plain_from(m)
    classes = {key: plain_class(m) for key, m in in_place.items()}  # every check before any change
    for key, m in in_place.items():
        unwrap_layer(m, classes[key])
    if not replace and not in_place:
        warnings.warn(f"strip: {type(model).__name__} contains no PNI module; nothing to strip", stacklevel=2)
        return model
    return _swap(model, replace) if replace else model
