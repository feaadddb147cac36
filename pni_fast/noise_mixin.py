"""What every noisy conv/linear layer shares: its ``pni``/``noise``/``alpha_init`` arguments and their
checks, its alpha parameters, its noisy weight and input, its repr and state_dict hints.

``_PNIMixin`` is the PNI part of :class:`~pni_fast.modules.NoisyConv2d`,
:class:`~pni_fast.modules.NoisyLinear` and of the layers ``convert`` wraps in place
(:mod:`pni_fast.wrap`); ``is_noisy_module`` recognises all of them by it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from .noise_calls import _refuse_script, active_draws, drawn_weight, noisy_input_call, noisy_weight_call

__all__ = ["PNI_MODES", "NOISE_TYPES", "check_pni", "check_noise", "check_alpha_init", "mode_of_alpha"]

# The mixin's methods call the noise through this module's names: torch.fx patches them here.
torch.fx.wrap("noisy_weight_call")
torch.fx.wrap("noisy_input_call")


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


class _PNIMixin:
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
            if active_draws():  # inside a batched forward (pni_fast.batching): maybe drawn ahead
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
        _refuse_script(self)

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
