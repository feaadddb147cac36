"""PNI for any conv/linear layer without touching its math: the layer keeps its own ``forward``.

``convert`` replaces plain ``nn.Conv2d``/``nn.Linear`` by ``NoisyConv2d``/``NoisyLinear``. Every other
layer of those families (``Conv1d``, ``Conv3d``, ``ConvTranspose1d/2d/3d``, a user's or timm's subclass
with its own ``forward`` such as a "same"-padding or weight-standardizing conv, a parametrized or pruned
layer) is converted *in place*: its class is swapped for a generated subclass ``Noisy<Class>`` whose
``forward`` draws the noisy weight and runs the original class's ``forward`` while ``self.weight``
returns that noisy tensor.

Why a weight swap for the duration of the forward rather than ``torch.nn.utils.parametrize``:
a parametrization renames the weight in the state_dict (``parametrizations.weight.original``), so
plain checkpoints stop loading, and it recomputes (here: redraws) the weight on every access,
so a forward that reads ``self.weight`` twice would see two different noises. The swap keeps the
state_dict keys (``weight``, ``bias`` plus ``alpha_w``/``alpha_i``), draws once per forward, and the
original forward runs unchanged: the layer's math stays its own. The swap is a property on the
generated class that returns the noisy tensor while the forward runs (held per thread, never on the
module, so threads sharing a layer each see their own draw) and the stored weight
otherwise (the parametrized weight for a parametrized layer); ``torch.export`` and ``torch.compile``
see ordinary attribute reads. ``torch.fx`` treats the generated class as it would the original: a
torch.nn layer stays a leaf (called, with fresh noise, when the GraphModule runs) and a user's class
is traced through, its noise a leaf call (:func:`pni_fast.modules.noisy_weight_call`).

``strip`` restores the original class (also when a parametrization was added after ``convert``).
Removing a parametrization that existed *before* ``convert`` needs ``strip`` first.
"""

from __future__ import annotations

import threading
from typing import Any

import torch.nn as nn
from torch.nn.utils import parametrize

from .modules import _PNIMixin

__all__ = ["WrappedPNI", "wrap_layer", "unwrap_layer", "plain_class", "is_wrapped"]

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


class WrappedPNI(_PNIMixin):
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
    from .modules import NoisyConv2d, NoisyLinear

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
