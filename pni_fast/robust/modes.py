"""The one place in pni_fast that switches a model's train/eval mode temporarily, and puts it back.

`model_mode` is used by the attacks, `evaluate` and the per-epoch evaluation of `train`;
`attack_mode` adds what an attack must also leave untouched (parameter ``requires_grad`` flags
and buffers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from .checks import check_choice

__all__ = ["Mode", "MODES", "model_mode", "attack_mode"]

Mode = Literal["eval", "current", "train"]
MODES = ("eval", "current", "train")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: Mode = "eval") -> Iterator[nn.Module]:
    """Run a block with ``model`` in ``mode``; put every submodule's train/eval flag back on exit.

    ``mode`` is "eval", "train" or "current" (leave the mode as it is). The flags are restored per
    submodule (a model with some submodules frozen in eval keeps that mix), also when the block raises.
    """
    check_choice("mode", mode, MODES)
    _check_model(model)
    training = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        yield model
    finally:
        for m, flag in training:
            m.training = flag


@contextlib.contextmanager
def attack_mode(model: nn.Module, mode: Mode = "eval") -> Iterator[nn.Module]:
    """Model state for an attack: `model_mode`, frozen parameters, untouched buffers; all restored on exit.

    Freezing keeps weight gradients out of ``param.grad`` and skips their computation. Buffers of
    modules that run in train mode during the attack (BatchNorm running statistics,
    ``num_batches_tracked``) are saved and copied back, so an attack never changes them; in eval mode
    nothing needs saving. Everything is put back exactly, even if the attack raises.
    """
    _check_model(model)
    with model_mode(model, mode):
        grads = [(p, p.requires_grad) for p in model.parameters()]
        saved = [
            (m, name, t, t.detach().clone())
            for m in model.modules()
            if m.training
            for name, t in m._buffers.items()
            if t is not None
        ]
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            yield model
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
            with torch.no_grad():
                for m, name, t, copy in saved:
                    m._buffers[name] = t  # in case the module replaced the tensor
                    t.copy_(copy)
