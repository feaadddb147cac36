"""CIFAR ResNet-20/32/44/56 (He et al. 2016, option-A shortcuts) in the original PNI code's layout.

Module names follow the original PNI repository (``conv_1_3x3``, ``bn_1``, ``stage_K.I.conv_a``,
``bn_a``, ``conv_b``, ``bn_b``, ``classifier``) so its checkpoints load by a key mapping
(``pni_fast.models.load_pni_checkpoint``). The option-A shortcut reproduces that code exactly:
``AvgPool2d(kernel_size=1, stride=2)`` (keep every other pixel) and then all-zero channels
concatenated *after* the input channels. Symmetric zero padding (other CIFAR ResNets) would put
the identity in the middle channels and change the outputs for the same weights.

Inputs are images in [0, 1]; the model normalises them itself (CIFAR-10 mean/std as buffers
``normalize.mean`` / ``normalize.std``, shape ``[3, 1, 1]``), as the original wraps its network in
a normalisation layer, so attacks can work in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.convert import convert
from ..nn.layers import check_noise, check_pni

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Normalize",
    "DownsampleA",
    "BasicBlock",
    "CifarResNet",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]

# the original PNI code's CIFAR-10 statistics (pixel values / 255)
CIFAR10_MEAN: tuple[float, float, float] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD: tuple[float, float, float] = (63.0 / 255, 62.1 / 255, 66.7 / 255)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are buffers (not trained, not counted as parameters)."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DownsampleA(nn.Module):
    """Option-A shortcut of the original code: subsample by ``stride``, then zeros after the channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 2) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"out_planes ({out_planes}) must be >= in_planes ({in_planes})")
        self.extra = out_planes - in_planes
        self.avg = nn.AvgPool2d(kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(x)
        zeros = x.new_zeros((x.shape[0], self.extra) + tuple(x.shape[2:]))
        return torch.cat((x, zeros), dim=1)


class BasicBlock(nn.Module):
    """3x3 conv - BN - ReLU - 3x3 conv - BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(planes)
        self.conv_b = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = (
            DownsampleA(in_planes, planes, stride) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(residual + out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, ``n`` blocks per stage."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.depth = depth
        self.num_classes = num_classes
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv_1_3x3 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn_1 = nn.BatchNorm2d(16)
        self.stage_1 = self._make_stage(16, 16, n, 1)
        self.stage_2 = self._make_stage(16, 32, n, 2)
        self.stage_3 = self._make_stage(32, 64, n, 2)
        self.classifier = nn.Linear(64, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """He-normal convs (fan_out), BN to identity, He-normal classifier with zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # == AvgPool2d(8) of the original on 32x32 inputs
        return self.classifier(x)


def cifar_resnet(
    depth: int, num_classes: int = 10, pni: Optional[str] = None, noise: str = "weight", alpha_init: float = 0.25
) -> CifarResNet:
    """A CIFAR ResNet of ``depth``; with ``pni`` set, every conv and the classifier are PNI layers
    (as in the original PNI models), otherwise a plain network."""
    if pni is not None:
        check_pni(pni)
    check_noise(noise)
    model = CifarResNet(depth, num_classes)
    if pni is not None:
        convert(model, pni=pni, noise=noise, alpha_init=alpha_init)
    return model


def resnet20(
    num_classes: int = 10, pni: Optional[str] = None, noise: str = "weight", alpha_init: float = 0.25
) -> CifarResNet:
    """ResNet-20 (269,722 parameters for 10 classes, plain)."""
    return cifar_resnet(20, num_classes, pni, noise, alpha_init)


def resnet32(
    num_classes: int = 10, pni: Optional[str] = None, noise: str = "weight", alpha_init: float = 0.25
) -> CifarResNet:
    """ResNet-32 (464,154 parameters for 10 classes, plain)."""
    return cifar_resnet(32, num_classes, pni, noise, alpha_init)


def resnet44(
    num_classes: int = 10, pni: Optional[str] = None, noise: str = "weight", alpha_init: float = 0.25
) -> CifarResNet:
    """ResNet-44 (658,586 parameters for 10 classes, plain)."""
    return cifar_resnet(44, num_classes, pni, noise, alpha_init)


def resnet56(
    num_classes: int = 10, pni: Optional[str] = None, noise: str = "weight", alpha_init: float = 0.25
) -> CifarResNet:
    """ResNet-56 (853,018 parameters for 10 classes, plain)."""
    return cifar_resnet(56, num_classes, pni, noise, alpha_init)
