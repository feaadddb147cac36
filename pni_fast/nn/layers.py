"""Drop-in PNI layers: ``NoisyConv2d``, ``NoisyLinear`` and the standalone ``NoiseInjection``.

The noisy layers subclass ``nn.Conv2d`` / ``nn.Linear`` so that ``isinstance`` checks, every
constructor argument and the state_dict keys of the plain layer keep working; they only add the
trainable noise scales ``alpha_w`` (weight noise, PNI-W) and ``alpha_i`` (input noise, PNI-A),
named as in the original PNI code so its checkpoints' keys match.

The forward pass costs one fused op per noise source (``pni_fast.functional``) plus the plain
conv/linear: no ``.item()``, no stored noise. Each call draws a fresh seed from PyTorch's default
CPU generator (so ``torch.manual_seed`` makes a run reproducible; it also advances that
generator). Weight noise is drawn before input noise.

Noise stays ON in ``eval()``: the defense relies on it at test time. Switch it off with the
per-module flag ``noise_enabled`` or with ``pni_fast.no_noise(model)`` / ``set_noise``.

Graph capture: every noise call goes through :func:`noisy_weight_call` / :func:`noisy_input_call`,
which ``torch.fx`` records as leaf calls (``torch.fx.wrap``), so a symbolically traced GraphModule
draws fresh noise when it runs. Under ``torch.export`` the seed is an RNG-state tensor made by
``torch.randint`` inside the graph (a host-drawn int would be a data-dependent value), so the
exported program also draws fresh noise per call. ``torch.jit.trace`` would freeze one draw into
constants and ``torch.jit.script`` cannot compile the Python op layer: both raise an error that
names ``pni_fast.no_noise`` / ``pni_fast.strip``, as does ONNX export with noise on.

The noise calls are in :mod:`pni_fast.nn.noise_calls`. What every noisy conv/linear layer shares (its
``pni``/``noise``/``alpha_init`` arguments and their checks, its alphas, noisy weight and input, repr and
state_dict hints) is :class:`PNIMixin`, also the base of the layers ``convert`` wraps in place
(:mod:`pni_fast.nn.convert`); ``is_noisy_module`` recognises all of them by it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .noise_calls import active_draws, drawn_weight, noisy_input_call, noisy_weight_call, refuse_script

__all__ = [
    "PNI_MODES",
    "NOISE_TYPES",
    "PNIMixin",
    "NoisyConv2d",
    "NoisyLinear",
    "NoiseInjection",
    "is_noisy_module",
    "alpha_parameters",
    "check_pni",
    "check_noise",
    "check_alpha_init",
    "mode_of_alpha",
]

# The layers call the noise through this module's names: torch.fx patches them here.
torch.fx.wrap("noisy_weight_call")
torch.fx.wrap("noisy_input_call")

# ---------------------------------------------------------------------------
# What every noisy conv/linear layer shares
# ---------------------------------------------------------------------------


PNI_MODES: tuple[str, ...] = ("layerwise", "channelwise", "elementwise")
NOISE_TYPES: tuple[str, ...] = ("weight", "input", "both")


def _quoted(options: tuple[str, ...]) -> str:
    quoted = [repr(o) for o in options]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_pni(pni: Any, allowed: tuple[str, ...] = PNI_MODES) -> str:
    """Validate a ``pni=`` argument; the error lists the valid modes."""
    if not isinstance(pni, str) or pni not in allowed:
        raise ValueError(f"pni must be {_quoted(allowed)}, got {pni!r}")
    return pni


def check_noise(noise: Any) -> str:
    """Validate a ``noise=`` argument; the error lists the valid noise types."""
    if not isinstance(noise, str) or noise not in NOISE_TYPES:
        raise ValueError(f"noise must be {_quoted(NOISE_TYPES)}, got {noise!r}")
    return noise


def check_alpha_init(alpha_init: Any) -> float:
    """Validate ``alpha_init``: a finite number >= 0 (alpha scales a standard deviation)."""
    if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)):
        if isinstance(alpha_init, torch.Tensor) and alpha_init.numel() == 1:
            alpha_init = float(alpha_init.item())
        else:
            raise TypeError(f"alpha_init must be a float, got {type(alpha_init).__name__} ({alpha_init!r})")
    value = float(alpha_init)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"alpha_init must be a finite number >= 0, got {alpha_init!r}")
    return value


def mode_of_alpha(alpha_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> Optional[str]:
    """Which PNI mode a weight-noise alpha of this shape encodes (None if it fits none)."""
    alpha_shape, weight_shape = tuple(alpha_shape), tuple(weight_shape)
    numel = math.prod(alpha_shape)
    if numel == 1 and math.prod(weight_shape) != 1:
        return "layerwise"
    if alpha_shape == weight_shape:
        return "elementwise"
    if len(weight_shape) >= 1 and alpha_shape == (weight_shape[0],) + (1,) * (len(weight_shape) - 1):
        return "channelwise"
    if numel == 1:
        return "layerwise"
    return None


class PNIMixin:
    """Shared state and checks of the noisy layers (not an ``nn.Module`` by itself).

    Subclasses define ``_input_channels`` and ``_input_layout`` (see :func:`noisy_input_call`).
    """

    pni: str
    noise: str
    alpha_init: float
    noise_enabled: bool
    alpha_w: Optional[nn.Parameter]
    alpha_i: Optional[nn.Parameter]

    def _setup_noise(self, pni: str, noise: str, alpha_init: float, device: Any, dtype: Any) -> None:
        self.pni = check_pni(pni)
        self.noise = check_noise(noise)
        self.alpha_init = check_alpha_init(alpha_init)
        if self.noise != "weight" and self.pni == "elementwise" and isinstance(self, nn.modules.conv._ConvNd):
            raise ValueError(
                f"pni='elementwise' input noise on {type(self).__name__} needs the input's spatial size, "
                "which is unknown "
                "when the layer is built; use pni='layerwise' or 'channelwise' with noise='input'/'both', or "
                "noise='weight'"
            )
        self.noise_enabled = True
        self._make_alphas(device, dtype)

    def _alpha_w_shape(self) -> tuple[int, ...]:
        w_shape = tuple(self.weight.shape)  # type: ignore[attr-defined]
        if self.pni == "layerwise":
            return (1,)
        if self.pni == "channelwise":
            return (w_shape[0],) + (1,) * (len(w_shape) - 1)
        return w_shape

    def _alpha_i_shape(self) -> tuple[int, ...]:
        return (1,) if self.pni == "layerwise" else (self._input_channels(),)

    def _make_alphas(self, device: Any, dtype: Any) -> None:
        """(Re)create the alpha parameters on ``device``/``dtype`` filled with ``alpha_init``."""
        fk = {"device": device, "dtype": dtype}
        alpha_w = alpha_i = None
        if self.noise in ("weight", "both"):
            alpha_w = nn.Parameter(torch.full(self._alpha_w_shape(), self.alpha_init, **fk))
        if self.noise in ("input", "both"):
            alpha_i = nn.Parameter(torch.full(self._alpha_i_shape(), self.alpha_init, **fk))
        self.register_parameter("alpha_w", alpha_w)  # type: ignore[attr-defined]
        self.register_parameter("alpha_i", alpha_i)  # type: ignore[attr-defined]

    def _reset_alphas(self) -> None:
        with torch.no_grad():
            for a in (getattr(self, "alpha_w", None), getattr(self, "alpha_i", None)):
                if a is not None:
                    a.fill_(self.alpha_init)

    def _noisy_weight(self) -> torch.Tensor:
        weight = self.weight  # type: ignore[attr-defined]
        if self.noise_enabled and self.alpha_w is not None:
            if active_draws():  # inside a batched forward (pni_fast.nn.batching): maybe drawn ahead
                return drawn_weight(self, weight, self.alpha_w)
            weight = noisy_weight_call(weight, self.alpha_w)
        return weight

    def _noisy_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.noise_enabled or self.alpha_i is None:
            return x
        return noisy_input_call(x, self.alpha_i, self._input_layout())

    def _input_channels(self) -> int:
        raise NotImplementedError

    def _input_layout(self) -> int:
        raise NotImplementedError

    def __prepare_scriptable__(self):
        refuse_script(self)

    def _noise_repr(self) -> str:
        s = f"pni={self.pni!r}, noise={self.noise!r}"
        if self.alpha_init != 0.25:
            s += f", alpha_init={self.alpha_init}"
        if not self.noise_enabled:
            s += ", noise_enabled=False"
        return s

    def _check_alpha_in_state_dict(self, state_dict: Any, prefix: str, error_msgs: list[str]) -> None:
        """Add a hint to torch's size-mismatch error: which mode the checkpoint's alpha encodes."""
        for name in ("alpha_w", "alpha_i"):
            key = prefix + name
            mine = getattr(self, name, None)
            if key not in state_dict or mine is None:
                continue
            theirs = state_dict[key]
            if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) == tuple(mine.shape):
                continue
            if name == "alpha_w":
                mode = mode_of_alpha(tuple(theirs.shape), tuple(self.weight.shape))  # type: ignore[attr-defined]
                hint = f"which is pni={mode!r}" if mode else "which fits no pni mode"
            else:
                hint = "which does not fit this layer's input noise"
            error_msgs.append(
                f"{key} in the checkpoint has shape {list(theirs.shape)} ({hint}), but this layer was built "
                f"with pni={self.pni!r} and expects {list(mine.shape)}: rebuild it with the checkpoint's mode"
            )

    # Shared by both layers; the mixin comes first in their MRO, so super() is the torch layer.
    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_alphas()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._noise_repr()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        self._check_alpha_in_state_dict(state_dict, prefix, error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# ---------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------


class NoisyConv2d(PNIMixin, nn.Conv2d):
    """``nn.Conv2d`` with Parametric Noise Injection on its weight and/or input.

    Args: every argument of ``nn.Conv2d``, plus
        pni: ``"layerwise"`` (one alpha, shape ``[1]``), ``"channelwise"`` (``[O, 1, 1, 1]``) or
            ``"elementwise"`` (the weight's shape). Input noise uses ``[1]`` or ``[in_channels]``.
        noise: ``"weight"`` (PNI-W, parameter ``alpha_w``), ``"input"`` (PNI-A, ``alpha_i``) or ``"both"``.
        alpha_init: initial value of every alpha (finite, >= 0; the paper uses 0.25).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        pni: str = "layerwise",
        noise: str = "weight",
        alpha_init: float = 0.25,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._setup_noise(pni, noise, alpha_init, device=self.weight.device, dtype=self.weight.dtype)

    def _input_channels(self) -> int:
        return self.in_channels

    def _input_layout(self) -> int:
        return 2  # [N, C, H, W], or unbatched [C, H, W]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self._noisy_weight()
        return self._conv_forward(self._noisy_input(input), weight, self.bias)


class NoisyLinear(PNIMixin, nn.Linear):
    """``nn.Linear`` with Parametric Noise Injection on its weight and/or input.

    Args: every argument of ``nn.Linear``, plus
        pni: ``"layerwise"`` (alpha ``[1]``), ``"channelwise"`` (``[out_features, 1]``) or ``"elementwise"``
            (the weight's shape). Input noise uses ``[1]`` or ``[in_features]`` (one per input feature).
        noise: ``"weight"`` (``alpha_w``), ``"input"`` (``alpha_i``) or ``"both"``.
        alpha_init: initial value of every alpha (finite, >= 0).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        pni: str = "layerwise",
        noise: str = "weight",
        alpha_init: float = 0.25,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_noise(pni, noise, alpha_init, device=self.weight.device, dtype=self.weight.dtype)

    def _input_channels(self) -> int:
        return self.in_features

    def _input_layout(self) -> int:
        return -1  # features are the last dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self._noisy_weight()
        return F.linear(self._noisy_input(input), weight, self.bias)


class NoiseInjection(nn.Module):
    """Standalone activation noise ``x + alpha * std(x) * z`` (PNI-A) to place anywhere in a model.

    Args:
        num_channels: size of dim 1 of the input; required for ``pni="channelwise"``.
        pni: ``"layerwise"`` (alpha ``[1]``) or ``"channelwise"`` (alpha ``[num_channels]``, one per channel).
        alpha_init: initial alpha (finite, >= 0).
    Input: ``[N, C, *]`` (channel dim 1). The parameter is named ``alpha``.
    """

    def __init__(
        self,
        num_channels: Optional[int] = None,
        pni: str = "layerwise",
        alpha_init: float = 0.25,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.pni = check_pni(pni, ("layerwise", "channelwise"))
        self.alpha_init = check_alpha_init(alpha_init)
        if num_channels is not None and (
            isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1
        ):
            raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}")
        if self.pni == "channelwise" and num_channels is None:
            raise ValueError("NoiseInjection(pni='channelwise') needs num_channels (the size of the input's dim 1)")
        self.num_channels = num_channels
        shape = (1,) if self.pni == "layerwise" else (num_channels,)
        self.alpha = nn.Parameter(torch.full(shape, self.alpha_init, device=device, dtype=dtype))
        self.noise_enabled = True

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.noise_enabled:
            return x
        return noisy_input_call(x, self.alpha, 0, self.num_channels if self.pni == "channelwise" else 0)

    def __prepare_scriptable__(self):
        refuse_script(self)

    def extra_repr(self) -> str:
        s = f"num_channels={self.num_channels}, pni={self.pni!r}" if self.num_channels else f"pni={self.pni!r}"
        if self.alpha_init != 0.25:
            s += f", alpha_init={self.alpha_init}"
        if not self.noise_enabled:
            s += ", noise_enabled=False"
        return s


def is_noisy_module(module: nn.Module) -> bool:
    """True for the modules whose noise ``set_noise``/``no_noise`` control (also layers ``convert``
    wrapped in place, which share ``PNIMixin``)."""
    return isinstance(module, (PNIMixin, NoiseInjection))


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every PNI alpha of ``model`` (each once, in module order)."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for m in model.modules():
        if not is_noisy_module(m):
            continue
        names = ("alpha",) if isinstance(m, NoiseInjection) else ("alpha_w", "alpha_i")
        for name in names:
            p = m._parameters.get(name)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
