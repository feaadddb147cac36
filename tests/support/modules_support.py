"""Helpers shared by the tests of the PNI modules (tests/nn/test_layers.py, tests/nn/test_noise_injection.py)."""

import torch
import torch.nn as nn

import pni_fast
from pni_fast.nn.layers import alpha_parameters


def draw_seeds(seed: int, n: int) -> list:
    """The seeds a module draws for its n noise sources after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return [pni_fast.draw_seed() for _ in range(n)]


def randomize_alphas(m: nn.Module) -> None:
    with torch.no_grad():
        for a in alpha_parameters(m):
            a.copy_(torch.rand_like(a) * 0.5 + 0.1)
