"""`TrainConfig`, the knobs of `pni_fast.robust.train.train`, and the optimizer and schedule it builds.

Defaults follow the original PNI code (github.com/elliothe/CVPR_2019_PNI, ``code/train_cifar.sh`` and
``code/main.py``): SGD with Nesterov momentum 0.9, lr 0.1 multiplied by 0.1 at epochs 80 and 120 of
160 (50% and 75%), batch 128, weight decay 3e-4 (the script's ``--decay 0.0003``) on every parameter
except the PNI alphas (own optimizer group with weight_decay 0), 5 clean warm-up epochs
(``--epoch_delay 5``), then PGD-7 adversarial training with the loss ``0.5 * CE(clean) + 0.5 *
CE(adversarial)``. The original's PGD uses eps 0.031 and step 0.01; we use the usual 8/255 and 2/255.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..nn.optim import param_groups
from .attacks import TARGETS
from .checks import check_choice, check_int, check_real

__all__ = ["TrainConfig", "resolve_device", "make_optimizer", "make_scheduler"]


@dataclass
class TrainConfig:
    """Every knob of `train`; defaults = the PNI paper's CIFAR-10 recipe (see module docstring)."""

    epochs: int = 160
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs`
    lr_gamma: float = 0.1
    warmup_epochs: int = 5  # clean epochs before adversarial training starts
    adversarial: bool = True
    adv_eps: float = 8 / 255
    adv_alpha: float = 2 / 255
    adv_steps: int = 7
    adv_random_start: bool = True
    adv_targets: str = "labels"
    adv_noise: bool = True  # keep PNI noise on while generating the adversarial batch
    clean_weight: float = 0.5
    adv_weight: float = 0.5
    augment: bool = False  # random crop (pad 4) + horizontal flip
    seed: int = 0
    eval_samples: Optional[int] = 1000  # test images evaluated after each epoch (None = all)
    eval_pgd_steps: int = 7

    def __post_init__(self) -> None:
        for name, minimum in (
            ("epochs", 1),
            ("batch_size", 1),
            ("warmup_epochs", 0),
            ("adv_steps", 1),
            ("eval_pgd_steps", 1),
            ("seed", 0),
        ):
            check_int(name, getattr(self, name), minimum)
        for name in ("lr", "adv_alpha"):
            check_real(name, getattr(self, name), positive=True)
        for name in ("momentum", "weight_decay", "lr_gamma", "adv_eps", "clean_weight", "adv_weight"):
            check_real(name, getattr(self, name))
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be fractions of the epochs in (0, 1), got {self.lr_milestones!r}")
        check_choice("adv_targets", self.adv_targets, TARGETS)
        if self.eval_samples is not None:
            check_int("eval_samples", self.eval_samples, 0)
        if self.clean_weight + self.adv_weight == 0:
            raise ValueError("clean_weight and adv_weight are both 0: the loss would be zero")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, ignoring unknown keys (checkpoints from other versions)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "lr_milestones" else v) for k, v in d.items() if k in names})


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'auto'/None -> cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the model's parameters, alphas in a weight-decay-free group."""
    return torch.optim.SGD(
        param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """Step decay at the configured fractions of the epochs (50%, 75% by default)."""
    milestones = sorted({max(1, int(round(f * config.epochs))) for f in config.lr_milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.lr_gamma)
