"""Optimizer parameter groups for PNI training.

The paper trains every ``alpha`` without weight decay: decay pulls the noise scale to zero and
with it the defense. ``param_groups`` excludes the alphas from decay and nothing else.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from .layers import alpha_parameters

__all__ = ["param_groups"]

_FOREIGN_ALPHA_NAMES = ("alpha_w", "alpha_i")


def param_groups(model: nn.Module, weight_decay: float, **group_options: Any) -> list[dict[str, Any]]:
    """Two optimizer groups: every trainable non-alpha parameter with ``weight_decay``, and every
    PNI alpha with ``weight_decay=0``.

    Alphas are those of pni_fast's noisy modules plus any parameter named ``alpha_w`` or
    ``alpha_i`` (the original PNI layers and ``pni_fast.reference``'s). Only parameters with
    ``requires_grad`` are included (each once, even when shared). Biases and normalisation
    parameters keep ``weight_decay`` (as in the original PNI training); build your own
    groups if you want them excluded too. Empty groups are omitted. ``group_options`` (e.g. ``lr``)
    are added to both groups. Use: ``torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"weight_decay must be a float, got {type(weight_decay).__name__} ({weight_decay!r})")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    alpha_ids = {id(p) for p in alpha_parameters(model)}
    # PNI layers from elsewhere (the original code, pni_fast.reference) name their scales alpha_w/alpha_i
    alpha_ids |= {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in _FOREIGN_ALPHA_NAMES}
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated by torch
        if not p.requires_grad:
            continue
        (no_decay if id(p) in alpha_ids else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), **group_options})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **group_options})
    return groups
