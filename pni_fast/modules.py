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

The noise calls are in :mod:`pni_fast.noise_calls`; what the two noisy layers share (their
arguments' checks, alphas, repr and state_dict hints) is ``_PNIMixin`` in :mod:`pni_fast.noise_mixin`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .noise_calls import _refuse_script, noisy_input_call, noisy_weight_call
from .noise_mixin import (  # noqa: F401  (the layers' argument checks and mixin, imported from here too)
    NOISE_TYPES,
    PNI_MODES,
    _PNIMixin,
    check_alpha_init,
    check_noise,
    check_pni,
    mode_of_alpha,
)

__all__ = [
    "PNI_MODES",
    "NOISE_TYPES",
    "NoisyConv2d",
    "NoisyLinear",
    "NoiseInjection",
    "is_noisy_module",
    "alpha_parameters",
    "noisy_weight_call",
    "noisy_input_call",
]

# NoiseInjection calls the noise through this module's names: torch.fx patches them here.
torch.fx.wrap("noisy_weight_call")
torch.fx.wrap("noisy_input_call")


class NoisyConv2d(_PNIMixin, nn.Conv2d):
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


class NoisyLinear(_PNIMixin, nn.Linear):
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
        _refuse_script(self)

    def extra_repr(self) -> str:
        s = f"num_channels={self.num_channels}, pni={self.pni!r}" if self.num_channels else f"pni={self.pni!r}"
        if self.alpha_init != 0.25:
            s += f", alpha_init={self.alpha_init}"
        if not self.noise_enabled:
            s += ", noise_enabled=False"
        return s


def is_noisy_module(module: nn.Module) -> bool:
    """True for the modules whose noise ``set_noise``/``no_noise`` control (also layers ``convert``
    wrapped in place, which share ``_PNIMixin``)."""
    return isinstance(module, (_PNIMixin, NoiseInjection))


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
