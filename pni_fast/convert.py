"""Turn any model into a PNI model in place (``convert``) and back (``strip``).

The swapped layers keep the *same* ``Parameter`` objects for ``weight`` and ``bias`` (no copy:
an optimizer or another reference to them stays valid; only the new alphas need adding to an
optimizer built before the conversion), plus device, dtype, training mode and forward/backward
hooks. A module shared in several places is converted once and stays shared.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Iterable, Union

import torch.nn as nn
from torch.nn.utils import parametrize

from .modules import NoiseInjection, NoisyConv2d, NoisyLinear, check_alpha_init, check_noise, check_pni

__all__ = ["convert", "strip", "noisy_from", "plain_from"]

SkipSpec = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _copy_module_state(src: nn.Module, dst: nn.Module) -> None:
    """Training mode and hooks of ``src`` onto ``dst`` (a user's hooks must survive the swap).

    The hook dicts are shared, not copied, so the handles the user holds still remove them.
    """
    for name in _HOOK_DICTS:
        hooks = getattr(src, name, None)
        if isinstance(hooks, dict) and hooks:
            setattr(dst, name, hooks)
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook
    dst.train(src.training)


def noisy_from(layer: nn.Module, pni: str = "layerwise", noise: str = "weight",
               alpha_init: float = 0.25) -> Union[NoisyConv2d, NoisyLinear]:
    """A noisy twin of one ``nn.Conv2d``/``nn.Linear`` sharing its weight and bias Parameters."""
    if isinstance(layer, nn.Conv2d):
        new: Union[NoisyConv2d, NoisyLinear] = NoisyConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
            bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta",
            pni=pni, noise=noise, alpha_init=alpha_init,
        )
    elif isinstance(layer, nn.Linear):
        new = NoisyLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                          pni=pni, noise=noise, alpha_init=alpha_init)
    else:
        raise TypeError(f"layer must be an nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    new.weight = layer.weight
    new.bias = layer.bias
    new._make_alphas(device=layer.weight.device, dtype=layer.weight.dtype)
    _copy_module_state(layer, new)
    return new


def plain_from(layer: nn.Module) -> nn.Module:
    """The plain twin of a PNI module (same Parameters; ``NoiseInjection`` becomes ``nn.Identity``)."""
    if isinstance(layer, NoisyConv2d):
        new: nn.Module = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
            bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta",
        )
    elif isinstance(layer, NoisyLinear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    elif isinstance(layer, NoiseInjection):
        new = nn.Identity()
        new.train(layer.training)
        return new
    else:
        raise TypeError(f"layer must be a NoisyConv2d, NoisyLinear or NoiseInjection, got {type(layer).__name__}")
    new.weight = layer.weight
    new.bias = layer.bias
    _copy_module_state(layer, new)
    return new


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
            raise TypeError(f"skip must be a name, an iterable of names or a callable(name, module), "
                            f"got an element {s!r}")
    pattern = [re.compile(re.escape(s) + r"(\..*)?") for s in names]
    return lambda name, m: any(p.fullmatch(name) for p in pattern)


def _check_layers(layers: Any) -> tuple[type, ...]:
    if isinstance(layers, type):
        layers = (layers,)
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one layer type (nn.Conv2d and/or nn.Linear)")
    for t in layers:
        if not isinstance(t, type) or not issubclass(t, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"layers may contain only nn.Conv2d, nn.Linear or their subclasses, got {t!r}")
    return layers


def _matches(m: nn.Module, layers: tuple[type, ...]) -> bool:
    if isinstance(m, (NoisyConv2d, NoisyLinear)) or not isinstance(m, layers):
        return False
    # A subclass may have its own forward that a noisy layer would drop: convert it only when its
    # exact class is listed (e.g. MultiheadAttention's out_proj is a Linear subclass it never calls).
    if parametrize.is_parametrized(m):
        return True  # its class is a generated subclass; convert() warns and leaves it alone
    if type(m) not in (nn.Conv2d, nn.Linear) and type(m) not in layers:
        return False
    return True


def _swap(model: nn.Module, replace: dict[int, nn.Module]) -> nn.Module:
    """Replace, in every parent, each child whose id is in ``replace`` (shared children stay shared)."""
    if id(model) in replace:
        return replace[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replace:
                setattr(parent, name, replace[id(child)])
    return model


def convert(
    model: nn.Module,
    pni: str = "layerwise",
    noise: str = "weight",
    layers: Any = (nn.Conv2d, nn.Linear),
    skip: SkipSpec = None,
    alpha_init: float = 0.25,
) -> nn.Module:
    """Swap every matching layer of ``model`` for its PNI twin, in place; returns ``model``.

    Args:
        pni, noise, alpha_init: as for ``NoisyConv2d`` / ``NoisyLinear``.
        layers: layer types to convert (``nn.Conv2d`` and/or ``nn.Linear``). Subclasses of those
            are converted only when their exact class is listed.
        skip: qualified module names (exact or dotted prefix) or a callable ``(name, module) -> bool``
            selecting layers to leave plain (e.g. ``skip="fc"``). A shared module is skipped when
            any of its names is.
    Weights are not copied: the noisy layers hold the same ``Parameter`` objects. Already noisy
    layers, lazy layers (not yet initialised) and parametrized layers are left alone (the latter
    two with a warning). Warns when no layer matched. If ``model`` itself is a matching layer,
    the new layer is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_pni(pni)
    check_noise(noise)
    check_alpha_init(alpha_init)
    layers = _check_layers(layers)
    skipped = _skip_predicate(skip)

    candidates: dict[int, nn.Module] = {}
    skip_ids: set[int] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if not _matches(m, layers):
            continue
        if skipped(name, m):
            skip_ids.add(id(m))
            continue
        candidates[id(m)] = m
    replace: dict[int, nn.Module] = {}
    warned = False
    for key, m in candidates.items():
        if key in skip_ids:
            continue
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            warnings.warn(f"convert: skipping an uninitialised lazy layer ({type(m).__name__}); "
                          "run one forward pass before converting", stacklevel=2)
            warned = True
            continue
        if parametrize.is_parametrized(m):
            warnings.warn(f"convert: skipping a parametrized layer ({type(m).__name__}); remove the "
                          "parametrization (or convert before adding it)", stacklevel=2)
            warned = True
            continue
        replace[key] = noisy_from(m, pni=pni, noise=noise, alpha_init=alpha_init)
    if not replace:
        if not warned:
            warnings.warn(f"convert: no layer of type {', '.join(t.__name__ for t in layers)} was converted in "
                          f"{type(model).__name__} (none matched, all skipped, or already noisy)", stacklevel=2)
        return model
    return _swap(model, replace)


def strip(model: nn.Module) -> nn.Module:
    """Undo ``convert`` in place: PNI layers become plain ``nn.Conv2d``/``nn.Linear`` holding the same
    weight/bias Parameters (alphas are dropped) and ``NoiseInjection`` becomes ``nn.Identity``.

    Returns ``model`` (or the plain layer when ``model`` itself is a PNI layer). Warns when
    ``model`` has no PNI module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    replace: dict[int, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, (NoisyConv2d, NoisyLinear, NoiseInjection)) and id(m) not in replace:
            replace[id(m)] = plain_from(m)
    if not replace:
        warnings.warn(f"strip: {type(model).__name__} contains no PNI module; nothing to strip", stacklevel=2)
        return model
    return _swap(model, replace)
