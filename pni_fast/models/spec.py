"""`build_model`: rebuild a model from the ``model_spec`` dict that training checkpoints store."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["RESNETS", "ARCHS", "build_model"]

RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")
ARCHS = ("digits_cnn",) + RESNETS


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The model ``spec`` describes: ``arch`` (one of `ARCHS`), ``pni`` (None/"none" = plain), ``noise``,
    ``num_classes``, and for digits_cnn ``in_channels`` and ``width``."""
    arch = spec.get("arch")
    pni = spec.get("pni")
    pni = None if pni in (None, "none") else pni
    noise = spec.get("noise", "weight")
    num_classes = int(spec.get("num_classes", 10))
    if arch == "digits_cnn":
        from .digits_cnn import DigitsCNN

        model: nn.Module = DigitsCNN(int(spec.get("in_channels", 1)), num_classes, int(spec.get("width", 32)))
        if pni is not None:
            from ..nn.convert import convert

            model = convert(model, pni=pni, noise=noise)
        return model
    if arch in RESNETS:
        from . import resnet_cifar

        return getattr(resnet_cifar, arch)(num_classes=num_classes, pni=pni, noise=noise)
    raise ValueError(f"model_spec arch must be one of {ARCHS}, got {arch!r}")
