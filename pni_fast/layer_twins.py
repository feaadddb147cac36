"""One layer to its noisy or plain twin, sharing its Parameters, and the swap of twins into a model.

``noisy_from`` builds a ``NoisyConv2d``/``NoisyLinear`` holding the *same* weight and bias
``Parameter`` objects as a plain ``nn.Conv2d``/``nn.Linear`` (built on the meta device, so nothing
is allocated or copied), with the layer's training mode and hooks; ``plain_from`` is the inverse.
``_swap`` puts the twins in place of the originals in every parent. :func:`pni_fast.convert` and
:func:`pni_fast.strip` walk a model and use these for the layers they replace.
"""

from __future__ import annotations

from typing import Union

import torch.nn as nn

from .modules import NoiseInjection, NoisyConv2d, NoisyLinear

__all__ = ["noisy_from", "plain_from"]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


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


def _conv_args(layer: nn.Conv2d) -> tuple:
    return layer.in_channels, layer.out_channels, layer.kernel_size


def _conv_kwargs(layer: nn.Conv2d) -> dict:
    """The constructor arguments that rebuild ``layer``'s geometry, on the meta device (the twin then
    takes the original's Parameters)."""
    return dict(
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device="meta",
    )


def noisy_from(
    layer: nn.Module, pni: str = "layerwise", noise: str = "weight", alpha_init: float = 0.25
) -> Union[NoisyConv2d, NoisyLinear]:
    """A noisy twin of one ``nn.Conv2d``/``nn.Linear`` sharing its weight and bias Parameters.

    Only those exact classes: a subclass may have its own forward that the twin would drop
    (``convert`` converts subclasses in place instead)."""
    if type(layer) not in (nn.Conv2d, nn.Linear) and isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise TypeError(
            f"layer must be exactly nn.Conv2d or nn.Linear, got the subclass {type(layer).__name__}: "
            "use pni_fast.convert, which keeps a subclass's own forward"
        )
    if isinstance(layer, nn.Conv2d):
        new: Union[NoisyConv2d, NoisyLinear] = NoisyConv2d(
            *_conv_args(layer), **_conv_kwargs(layer), pni=pni, noise=noise, alpha_init=alpha_init
        )
    elif isinstance(layer, nn.Linear):
        new = NoisyLinear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",
            pni=pni,
            noise=noise,
            alpha_init=alpha_init,
        )
    else:
        raise TypeError(f"layer must be an nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    new.weight = layer.weight
    new.bias = layer.bias
    new._make_alphas(device=layer.weight.device, dtype=layer.weight.dtype)
    _copy_module_state(layer, new)
    return new


def plain_from(layer: nn.Module) -> nn.Module:
    """The plain twin of a PNI module (same Parameters; ``NoiseInjection`` becomes ``nn.Identity``)."""
    if isinstance(layer, (NoisyConv2d, NoisyLinear)) and type(layer) not in (NoisyConv2d, NoisyLinear):
        raise TypeError(
            f"layer must be a NoisyConv2d or NoisyLinear, got the subclass {type(layer).__name__} "
            "(a parametrized layer?): use pni_fast.strip, which converts such layers in place"
        )
    if isinstance(layer, NoisyConv2d):
        new: nn.Module = nn.Conv2d(*_conv_args(layer), **_conv_kwargs(layer))
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


def _swap(model: nn.Module, replace: dict[int, nn.Module]) -> nn.Module:
    """Replace, in every parent, each child whose id is in ``replace`` (shared children stay shared)."""
    if id(model) in replace:
        return replace[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replace:
                setattr(parent, name, replace[id(child)])
    return model
