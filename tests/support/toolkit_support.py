"""Helpers shared by the toolkit's evaluation tests (test_evaluate, test_eot_square, test_predict,
test_worst_of_k): a tiny digits-sized CNN, one trained on noisy prototype images, its PNI copy, and a
"randomized" model whose every pass is scripted in advance."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import pni_fast


def tiny_cnn(seed: Optional[int] = None) -> nn.Module:
    """Conv(1->4) + linear for 1x8x8 inputs; ``seed`` re-seeds torch first (None: the current state)."""
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def prototype_digits(n_test: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny CNN trained on random data (ten noisy prototype images, one per class), and ``n_test`` test images."""
    g = torch.Generator().manual_seed(1)
    protos = torch.rand(10, 1, 8, 8, generator=g)

    def make(n: int):
        y = torch.arange(n) % 10
        return (protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), y

    xt, yt = make(320)
    model = tiny_cnn(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = make(n_test)
    return model.eval(), x, y


def pni_copy(model: nn.Module, alpha: float = 0.25) -> nn.Module:
    """A PNI-W (layerwise) copy of a ``tiny_cnn`` in eval mode."""
    m = tiny_cnn()
    m.load_state_dict(model.state_dict())
    return pni_fast.convert(m, pni="layerwise", noise="weight", alpha_init=alpha).eval()


class Scripted(nn.Module):
    """Pass i returns ``table[i % len(table)]``: a randomized model whose every answer is known in advance."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.calls = 0

    def forward(self, x):
        out = self.table[self.calls % self.table.shape[0]][: x.shape[0]]
        self.calls += 1
        return out + 0 * x.flatten(1)[:, :1]
