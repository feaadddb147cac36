"""Turn any model into a PNI model in place (``convert``) and back (``strip``).

Plain ``nn.Conv2d``/``nn.Linear`` layers are replaced by ``NoisyConv2d``/``NoisyLinear`` holding the
*same* ``Parameter`` objects for ``weight`` and ``bias`` (no copy: an optimizer or another reference to
them stays valid; only the new alphas need adding to an optimizer built before the conversion), plus
device, dtype, training mode and forward/backward hooks. Every other layer of the conv/linear families
(``Conv1d``, ``Conv3d``, ``ConvTranspose1d/2d/3d``, subclasses with their own ``forward``, parametrized
or pruned layers) is converted in place and keeps its own ``forward`` (below): a
layer's math never changes, only its weight gets noise. What cannot be converted is listed with the
reason (``report=True`` / ``verbose=True``) and, when the layer would have been converted, warned
about. A module shared in several places is converted once and stays shared.

This file holds the whole of conversion, in three parts: one layer to its noisy or plain *twin*
(a new ``NoisyConv2d``/``NoisyLinear`` sharing the Parameters), one layer converted *in place*
(its class swapped, its own ``forward`` kept), and the model walk (what to do with each layer, the
report). The whole-model noise hooks ``convert`` installs are :mod:`pni_fast.nn.batching`.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .batching import batch_weight_noise, remove_batching
from .layers import (
    NoiseInjection,
    NoisyConv2d,
    NoisyLinear,
    PNIMixin,
    check_alpha_init,
    check_noise,
    check_pni,
    is_noisy_module,
)

__all__ = [
    "convert",
    "strip",
    "noisy_from",
    "plain_from",
    "ConvertReport",
    "SUPPORTED_LAYERS",
    "WrappedPNI",
    "wrap_layer",
    "unwrap_layer",
    "plain_class",
    "is_wrapped",
]

# ---------------------------------------------------------------------------
# One layer to its twin
# ---------------------------------------------------------------------------
# One layer to its noisy or plain twin, sharing its Parameters, and the swap of twins into a model.
#
# ``noisy_from`` builds a ``NoisyConv2d``/``NoisyLinear`` holding the *same* weight and bias
# ``Parameter`` objects as a plain ``nn.Conv2d``/``nn.Linear`` (built on the meta device, so nothing
# is allocated or copied), with the layer's training mode and hooks; ``plain_from`` is the inverse.
# ``_swap`` puts the twins in place of the originals in every parent. :func:`pni_fast.convert` and
# :func:`pni_fast.strip` walk a model and use these for the layers they replace.

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


# ---------------------------------------------------------------------------
# One layer converted in place
# ---------------------------------------------------------------------------
# PNI for any conv/linear layer without touching its math: the layer keeps its own ``forward``.
#
# ``convert`` replaces plain ``nn.Conv2d``/``nn.Linear`` by ``NoisyConv2d``/``NoisyLinear``. Every other
# layer of those families (``Conv1d``, ``Conv3d``, ``ConvTranspose1d/2d/3d``, a user's or timm's subclass
# with its own ``forward`` such as a "same"-padding or weight-standardizing conv, a parametrized or pruned
# layer) is converted *in place*: its class is swapped for a generated subclass ``Noisy<Class>`` whose
# ``forward`` draws the noisy weight and runs the original class's ``forward`` while ``self.weight``
# returns that noisy tensor.
#
# Why a weight swap for the duration of the forward rather than ``torch.nn.utils.parametrize``:
# a parametrization renames the weight in the state_dict (``parametrizations.weight.original``), so
# plain checkpoints stop loading, and it recomputes (here: redraws) the weight on every access,
# so a forward that reads ``self.weight`` twice would see two different noises. The swap keeps the
# state_dict keys (``weight``, ``bias`` plus ``alpha_w``/``alpha_i``), draws once per forward, and the
# original forward runs unchanged: the layer's math stays its own. The swap is a property on the
# generated class that returns the noisy tensor while the forward runs (held per thread, never on the
# module, so threads sharing a layer each see their own draw) and the stored weight
# otherwise (the parametrized weight for a parametrized layer); ``torch.export`` and ``torch.compile``
# see ordinary attribute reads. ``torch.fx`` treats the generated class as it would the original: a
# torch.nn layer stays a leaf (called, with fresh noise, when the GraphModule runs) and a user's class
# is traced through, its noise a leaf call (:func:`pni_fast.nn.noise_calls.noisy_weight_call`).
#
# ``strip`` restores the original class (also when a parametrization was added after ``convert``).
# Removing a parametrization that existed *before* ``convert`` needs ``strip`` first.

_NOISE_ATTRS = ("pni", "noise", "alpha_init", "noise_enabled")
# the noisy weight of each wrapped layer whose forward is running, per thread (never on the module: two
# threads running one layer each see their own draw)
_running = threading.local()


def _overrides() -> dict:
    table = getattr(_running, "weights", None)
    if table is None:
        table = _running.weights = {}
    return table


_CLASSES: dict[type, type] = {}


class WrappedPNI(PNIMixin):
    """The PNI part of a layer converted in place; ``Noisy<Class>`` = (``WrappedPNI``, original class)."""

    _pni_base_class: type
    _pni_weight_ref: tuple  # (the generated class's weight property,): a later parametrization replaces it

    def _input_channels(self) -> int:
        return self.in_channels if isinstance(self, nn.modules.conv._ConvNd) else self.in_features

    def _input_layout(self) -> int:
        return len(self.kernel_size) if isinstance(self, nn.modules.conv._ConvNd) else -1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original class's forward with ``self.weight`` noisy (drawn first, as in NoisyConv2d) and,
        with input noise, a noisy first argument."""
        if not self.noise_enabled:
            return super().forward(*args, **kwargs)
        noisy = None
        if self.alpha_w is not None:
            if type(self).weight is not self._pni_weight_ref[0]:
                raise RuntimeError(
                    f"{type(self).__name__}: a parametrization registered after pni_fast.convert hides the noisy "
                    "weight from the layer's forward; call pni_fast.strip(model), register the parametrization, "
                    "then convert again"
                )
            noisy = self._noisy_weight()
        if self.alpha_i is not None:
            if args:
                args = (self._noisy_input(args[0]),) + args[1:]
            elif "input" in kwargs:
                kwargs["input"] = self._noisy_input(kwargs["input"])
            else:
                raise TypeError(f"{type(self).__name__}: input noise needs the input as the first argument")
        if noisy is None:
            return super().forward(*args, **kwargs)
        table = _overrides()
        outer = table.get(self)  # a re-entrant call of the same layer restores the outer call's weight
        table[self] = noisy
        try:
            return super().forward(*args, **kwargs)
        finally:
            if outer is None:
                del table[self]
            else:
                table[self] = outer

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle/deepcopy by the original class (the generated class has no importable name)."""
        base = type(self)._pni_base_class
        if _CLASSES.get(base) is not type(self):
            return super().__reduce_ex__(protocol)
        return (_rebuild, (base,), self.__getstate__())  # a parametrized base refuses here, with its message


def _rebuild(base: type) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = _wrapped_class(base)
    return obj


def _weight_property(base: type) -> property:
    """``weight``: the noisy tensor during a forward, else what ``base`` would return."""
    inherited = None
    for klass in base.__mro__:  # a parametrized class (or a user's class) may define weight as a property
        if "weight" in klass.__dict__:
            inherited = klass.__dict__["weight"]
            break

    def fget(self):
        now = _overrides().get(self)
        if now is not None:
            return now
        if inherited is not None:
            return inherited.__get__(self, type(self))
        if "weight" in self.__dict__:  # a pruned layer: weight_orig * mask, set by prune's pre-hook
            return self.__dict__["weight"]
        return nn.Module.__getattr__(self, "weight")  # looked up now: torch.fx patches it while tracing

    def fset(self, value):
        if inherited is not None and hasattr(inherited, "__set__"):
            inherited.__set__(self, value)
        else:  # a plain tensor attribute (torch.nn.utils.prune sets one before each forward)
            self.__dict__["weight"] = value

    def fdel(self):  # reached when nn.Module.__delattr__ found no parameter "weight" (prune.remove)
        if inherited is not None and hasattr(inherited, "__delete__"):
            inherited.__delete__(self)
        elif "weight" in self.__dict__:
            del self.__dict__["weight"]
        else:
            raise AttributeError(f"{type(self).__name__} has no attribute 'weight'")

    return property(fget, fset, fdel, doc="The layer's weight (noisy while its forward runs).")


def _wrapped_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        prop = _weight_property(base)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return WrappedPNI.forward(self, *args, **kwargs)

        forward.__wrapped__ = base.forward  # inspect.signature / torch.fx see the original arguments
        forward.__doc__ = WrappedPNI.forward.__doc__
        # __module__ of the original class: torch.fx keeps a torch.nn layer a leaf (called at run time, as the
        # plain layer would be) and traces through a user's class (as it would the plain one)
        ns = {
            "_pni_base_class": base,
            "weight": prop,
            "_pni_weight_ref": (prop,),
            "__module__": base.__module__,
            "forward": forward,
            "__doc__": f"{base.__name__} with Parametric Noise Injection (made by pni_fast.convert).",
        }
        cls = type(f"Noisy{base.__name__}", (WrappedPNI, base), ns)
        _CLASSES[base] = cls
    return cls


def is_wrapped(module: nn.Module) -> bool:
    return isinstance(module, WrappedPNI)


def wrap_layer(module: nn.Module, pni: str, noise: str, alpha_init: float) -> nn.Module:
    """Turn ``module`` (a conv or linear layer, any subclass) into its PNI version in place."""
    weight = module.weight
    module.__class__ = _wrapped_class(type(module))
    try:
        module._setup_noise(pni, noise, alpha_init, device=weight.device, dtype=weight.dtype)
    except BaseException:
        unwrap_layer(module)
        raise
    return module


def _plain_class(module: nn.Module, pni_base: type, plain_base: type) -> type:
    """The class of a PNI layer with its PNI base replaced by ``plain_base``: the class itself for the
    generated ones, a rebuilt parametrized class when ``torch.nn.utils.parametrize`` subclassed it later."""
    cls = type(module)
    if cls is pni_base:
        return plain_base
    if cls.__bases__[0] is pni_base and parametrize.is_parametrized(module):
        ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        return type(f"Parametrized{plain_base.__name__}", (plain_base,), ns)
    raise TypeError(
        f"strip: cannot restore {cls.__name__} (a subclass of {pni_base.__name__} that is not a "
        "parametrization); call pni_fast.strip before subclassing or re-classing the layer"
    )


def plain_class(module: nn.Module) -> type:
    """The class ``module`` gets back from :func:`unwrap_layer` (TypeError when it cannot be restored)."""
    if is_wrapped(module):
        pni_base = next(
            c
            for c in type(module).__mro__
            if c.__dict__.get("_pni_base_class") is not None and _CLASSES.get(c.__dict__["_pni_base_class"]) is c
        )
        return _plain_class(module, pni_base, pni_base._pni_base_class)
    for pni_base, plain_base in ((NoisyConv2d, nn.Conv2d), (NoisyLinear, nn.Linear)):
        if isinstance(module, pni_base):
            return _plain_class(module, pni_base, plain_base)
    raise TypeError(f"not a PNI layer: {type(module).__name__}")


def unwrap_layer(module: nn.Module, new_cls: type | None = None) -> nn.Module:
    """Undo :func:`wrap_layer` (or turn a parametrized ``NoisyConv2d``/``NoisyLinear`` into a parametrized
    ``nn.Conv2d``/``nn.Linear``) in place: same object, same Parameters, alphas and flags removed."""
    new_cls = plain_class(module) if new_cls is None else new_cls
    for name in ("alpha_w", "alpha_i"):
        module._parameters.pop(name, None)
    for name in _NOISE_ATTRS:
        module.__dict__.pop(name, None)
    module.__class__ = new_cls
    return module


# ---------------------------------------------------------------------------
# The model walk
# ---------------------------------------------------------------------------
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
        if is_wrapped(m) or (isinstance(m, PNIMixin) and type(m) not in (NoisyConv2d, NoisyLinear)):
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
