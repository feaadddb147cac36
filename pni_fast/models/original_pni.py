"""Load checkpoints of the original PNI code (Rakin et al.) into ``pni_fast.models``.

The original wraps its CIFAR ResNet in ``nn.Sequential(Normalize_layer, net)``, so its keys are
``0.mean`` / ``0.std`` (``[3, 1, 1]``) and ``1.<name>`` for the network (``1.conv_1_3x3.weight``,
``1.bn_1.*``, ``1.stage_K.I.conv_a|bn_a|conv_b|bn_b.*``, ``1.classifier.weight|bias``); each noisy
layer adds ``alpha_w``, whose shape says the PNI mode (``[1]`` layerwise, ``[O, 1, 1, 1]`` /
``[O, 1]`` channelwise, the weight's shape elementwise). Mapping: ``0.X -> normalize.X`` and
``1.X -> X``. A ``module.`` prefix (DataParallel) and a ``{"state_dict": ...}`` wrapper are accepted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..nn.convert import noisy_from
from ..nn.layers import NoisyConv2d, NoisyLinear, mode_of_alpha
from .resnet_cifar import CifarResNet

__all__ = ["load_pni_checkpoint", "map_pni_state_dict", "infer_depth"]

_ARCHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


def _read(state_dict: Any) -> dict[str, torch.Tensor]:
    if isinstance(state_dict, (str, os.PathLike)):
        try:
            state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
        except Exception as e:  # the original saves extra Python objects next to the weights
            raise ValueError(
                f"could not read {os.fspath(state_dict)!r} with torch.load(weights_only=True) ({e}). If you trust "
                "the file, load it yourself with torch.load(path, weights_only=False) and pass the dict"
            ) from e
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping or a path, got {type(state_dict).__name__}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out = {}
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict entries must be str -> Tensor, got {k!r}: {type(v).__name__}")
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def map_pni_state_dict(state_dict: Any) -> dict[str, torch.Tensor]:
    """The original layout's keys renamed to ``pni_fast.models.CifarResNet``'s (values untouched)."""
    sd = _read(state_dict)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in ("0.mean", "0.std"):
            out["normalize." + k[2:]] = v.reshape(-1, 1, 1)
        elif k.startswith("1."):
            out[k[2:]] = v
        else:
            raise ValueError(
                f"unexpected key {k!r}: an original PNI checkpoint has keys '0.mean', '0.std' and '1.<layer>...'"
            )
    return out


def infer_depth(mapped: Mapping[str, torch.Tensor]) -> int:
    """ResNet depth 6n+2 from the number of blocks in ``stage_1`` of a mapped state_dict."""
    blocks = {int(m.group(1)) for k in mapped if (m := re.match(r"stage_1\.(\d+)\.", k))}
    if not blocks:
        raise ValueError("cannot infer the depth: no 'stage_1.<i>.' keys in the checkpoint")
    return 6 * (max(blocks) + 1) + 2


def _layer_modes(mapped: Mapping[str, torch.Tensor]) -> dict[str, tuple[Optional[str], bool]]:
    """Per layer name with noise in the checkpoint: (weight-noise mode or None, has input noise)."""
    modes: dict[str, tuple[Optional[str], bool]] = {}
    for k, v in mapped.items():
        if not (k.endswith(".alpha_w") or k.endswith(".alpha_i")):
            continue
        layer = k.rsplit(".", 1)[0]
        mode, has_i = modes.get(layer, (None, False))
        if k.endswith(".alpha_w"):
            w = mapped.get(layer + ".weight")
            if w is None:
                raise ValueError(f"checkpoint has {k!r} but no {layer + '.weight'!r}")
            mode = mode_of_alpha(tuple(v.shape), tuple(w.shape))
            if mode is None:
                raise ValueError(
                    f"alpha_w of layer {layer!r} has shape {list(v.shape)}, which fits no PNI mode for a weight of "
                    f"shape {list(w.shape)}: expected [1] (layerwise), [{w.shape[0]}{', 1' * (w.dim() - 1)}] "
                    f"(channelwise) or {list(w.shape)} (elementwise)"
                )
        else:
            has_i = True
        modes[layer] = (mode, has_i)
    return modes


def _input_mode(alpha_i: torch.Tensor) -> str:
    return "layerwise" if alpha_i.numel() == 1 else "channelwise"


def _build(depth: int, mapped: Mapping[str, torch.Tensor]) -> CifarResNet:
    cw = mapped.get("classifier.weight")
    if cw is None:
        raise ValueError("checkpoint has no '1.classifier.weight'")
    model = CifarResNet(depth, num_classes=int(cw.shape[0]))
    for layer, (mode, has_i) in _layer_modes(mapped).items():
        try:
            plain = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"checkpoint has noise on {layer!r}, which ResNet-{depth} does not have") from None
        if mode is not None and has_i:
            noise = "both"
        else:
            noise = "weight" if mode is not None else "input"
        if mode is None:
            mode = _input_mode(mapped[layer + ".alpha_i"])
        elif has_i and _input_mode(mapped[layer + ".alpha_i"]) != mode and mode != "elementwise":
            raise ValueError(f"layer {layer!r}: alpha_w and alpha_i encode different PNI modes")
        parent_name, _, child = layer.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, noisy_from(plain, pni=mode, noise=noise))
    return model


def _check_fits(model: nn.Module, mapped: Mapping[str, torch.Tensor]) -> None:
    """Clear errors for noise the model lacks or alpha shapes that do not fit its layers."""
    for k, v in mapped.items():
        for name in ("alpha_w", "alpha_i"):
            if not k.endswith("." + name):
                continue
            layer = k[: -len(name) - 1]
            try:
                m = model.get_submodule(layer)
            except AttributeError:
                continue  # reported as an unexpected key
            mine = getattr(m, name, None) if isinstance(m, (NoisyConv2d, NoisyLinear)) else None
            kind = "weight" if name == "alpha_w" else "input"
            if mine is None:
                raise ValueError(
                    f"the checkpoint has {kind} noise on {layer!r} ({name} of shape {list(v.shape)}) but the model's "
                    f"layer has none: build it with pni=... and noise=... to match, or pass the architecture "
                    f"name to load_pni_checkpoint"
                )
            if tuple(v.shape) != tuple(mine.shape) and not (v.numel() == 1 and mine.numel() == 1):
                got = mode_of_alpha(tuple(v.shape), tuple(m.weight.shape)) if name == "alpha_w" else None
                raise ValueError(
                    f"{name} of {layer!r} has shape {list(v.shape)}"
                    + (f" (pni={got!r})" if got else "")
                    + f" in the checkpoint, but the model's layer has pni={m.pni!r} and expects "
                    f"{list(mine.shape)}"
                )


def load_pni_checkpoint(
    model_or_arch: Union[nn.Module, str, None], state_dict: Any, strict: bool = True
) -> CifarResNet:
    """Load an original-PNI CIFAR ResNet checkpoint; returns the model.

    Args:
        model_or_arch: a ``pni_fast.models`` CIFAR ResNet to load into (its PNI modes must match the
            checkpoint's), an architecture name (``"resnet20"``, ``"resnet32"``, ``"resnet44"``,
            ``"resnet56"``), or None to infer the depth. With a name, the model is built with the PNI
            mode each layer's ``alpha_w`` reveals and the checkpoint's number of classes.
        state_dict: the checkpoint's state_dict (or ``{"state_dict": ...}``, or a path read with
            ``weights_only=True``).
        strict: missing or unexpected keys are errors (``num_batches_tracked``, absent from very old
            checkpoints, may be missing either way).
    """
    mapped = map_pni_state_dict(state_dict)
    if model_or_arch is None or isinstance(model_or_arch, str):
        depth = infer_depth(mapped)
        if isinstance(model_or_arch, str):
            if model_or_arch not in _ARCHS:
                raise ValueError(
                    f"model_or_arch must be one of {sorted(_ARCHS)}, an nn.Module or None, got {model_or_arch!r}"
                )
            if _ARCHS[model_or_arch] != depth:
                raise ValueError(
                    f"the checkpoint holds a ResNet-{depth} (stage_1 has {(depth - 2) // 6} blocks), "
                    f"not a {model_or_arch}"
                )
        model: nn.Module = _build(depth, mapped)
    elif isinstance(model_or_arch, nn.Module):
        model = model_or_arch
    else:
        raise TypeError(
            f"model_or_arch must be an nn.Module, an architecture name or None, got {type(model_or_arch).__name__}"
        )
    _check_fits(model, mapped)
    own = model.state_dict()
    for k, v in list(mapped.items()):  # a layerwise alpha may be stored 0-d or [1]
        if k in own and v.numel() == 1 and own[k].numel() == 1 and v.shape != own[k].shape:
            mapped[k] = v.reshape(own[k].shape)
    for k, v in mapped.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{k!r} has shape {list(v.shape)} in the checkpoint but {list(own[k].shape)} in the "
                f"model (wrong depth, width or number of classes?)"
            )
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(
                "missing from the checkpoint: "
                + ", ".join(
                    "1." + k if not k.startswith("normalize.") else "0." + k[len("normalize.") :] for k in missing
                )
            )
        if unexpected:
            parts.append("not in the model: " + ", ".join(unexpected))
        raise ValueError("checkpoint does not match the model; " + "; ".join(parts))
    model.load_state_dict(mapped, strict=False)
    return model  # type: ignore[return-value]
