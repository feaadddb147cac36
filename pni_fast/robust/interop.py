"""AutoAttack's version for randomized defenses, the Square attack and EOT-Square, through torchattacks.

torchattacks is an optional dependency, imported on first use. Its attacks run here under the rules
of `pni_fast.robust.attacks`: our ``mode`` governs (torchattacks' own eval/train switching is
disabled), PNI draws its seeds from its own generator during the call (torchattacks reseeds torch on
every batch, which would otherwise replay the same noise), and the caller's torch RNG state is put
back afterwards.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..rng import own_generator
from ._deps import require
from .attacks import NORMS, Norm, Targets, check_inputs, resolve_targets
from .checks import check_choice, check_int, check_real
from .modes import Mode, attack_mode

__all__ = ["autoattack_rand", "square_attack", "eot_square_attack"]


def _keep_mode(*_args, **_kwargs) -> None:
    """Replaces torchattacks' own eval()/train() switching: `attack_mode` has already set the mode."""


def _run_torchattack(model, x, y, *, eps: float, norm: str, targets: str, mode: str, build) -> torch.Tensor:
    """Run the torchattacks attack made by ``build(torchattacks, model)`` on (x, targets) under our rules."""
    ta = require("torchattacks", "AutoAttack-rand and Square (they run through torchattacks)")
    check_inputs(model, x, y)
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch [N, C, H, W] for torchattacks' attacks, got shape {tuple(x.shape)}")
    x0 = x.detach()
    with attack_mode(model, mode):
        target = resolve_targets(model, x0, y, targets)
        if x0.numel() == 0 or eps == 0:
            return x0.clone()
        atk = build(ta, model)
        atk.set_device(x0.device)
        stack = [atk]
        while stack:  # the attack and every attack nested in it (MultiAttack)
            a = stack.pop()
            a._change_model_mode = a._recover_model_mode = _keep_mode
            stack.extend(a._attacks.values())
        devices = [x0.device] if x0.device.type == "cuda" else []
        # own_generator outside fork_rng: its seed draw advances the caller's stream, so the next call differs
        with own_generator(), torch.random.fork_rng(devices=devices):
            out = atk(x0, target)
        return out.detach().to(x0.dtype)


def _ta_norm(norm: str) -> str:
    check_choice("norm", norm, NORMS)
    return "Linf" if norm == "linf" else "L2"


def autoattack_rand(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    eps: float = 8 / 255,
    norm: Norm = "linf",
    steps: int = 100,
    eot_samples: int = 20,
    restarts: int = 1,
    seed: int = 0,
    targets: Targets = "labels",
    mode: Mode = "eval",
) -> torch.Tensor:
    """AutoAttack's version for randomized defenses (Croce & Hein 2020), through torchattacks.

    APGD-CE, then APGD-DLR on the examples still classified correctly, each
    averaging its gradient over ``eot_samples`` noisy passes: the attacks of
    ``torchattacks.AutoAttack(version="rand")``, which fixes 10 steps and 20
    EOT samples; here they are arguments (defaults: the original AutoAttack's
    100 steps x 20 samples). Needs ``pip install torchattacks``.

    Args:
        x: images [N, C, H, W] in [0, 1].
        seed: torchattacks' seed for the random starts (the same on every call).
        targets, mode: as in `pgd`; the model state is restored afterwards.
    """
    eps = check_real("eps", eps)
    check_int("steps", steps, 1)
    check_int("eot_samples", eot_samples, 1)
    check_int("restarts", restarts, 1)
    check_int("seed", seed, 0)
    kw = dict(norm=_ta_norm(norm), eps=eps, steps=steps, n_restarts=restarts, seed=seed, eot_iter=eot_samples)

    def build(ta, m):
        return ta.MultiAttack([ta.APGD(m, loss="ce", **kw), ta.APGD(m, loss="dlr", **kw)])

    return _run_torchattack(model, x, y, eps=eps, norm=norm, targets=targets, mode=mode, build=build)


def square_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    eps: float = 8 / 255,
    norm: Norm = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    seed: int = 0,
    targets: Targets = "labels",
    mode: Mode = "eval",
) -> torch.Tensor:
    """Square Attack (Andriushchenko et al. 2020), through torchattacks: a gradient-free random search.

    It uses only the model's outputs (margin loss), so gradient masking cannot
    fool it; each query is one noisy forward pass. ``n_queries`` per restart
    (AutoAttack uses 5000), ``p_init`` the initial square size. Needs
    ``pip install torchattacks``; arguments otherwise as in `autoattack_rand`.
    """
    eps = check_real("eps", eps)
    check_int("n_queries", n_queries, 1)
    p_init = check_real("p_init", p_init, positive=True, maximum=1)
    check_int("restarts", restarts, 1)
    check_int("seed", seed, 0)
    kw = dict(
        norm=_ta_norm(norm), eps=eps, n_queries=n_queries, n_restarts=restarts, p_init=p_init, seed=seed, loss="margin"
    )

    def build(ta, m):
        return ta.Square(m, **kw)

    return _run_torchattack(model, x, y, eps=eps, norm=norm, targets=targets, mode=mode, build=build)


_EOT_SQUARE: dict[int, type] = {}


def _eot_square_class(ta) -> type:
    """torchattacks' Square with every verdict on the margin averaged over ``eot_samples`` noisy passes.

    Square's random search (square sizes, positions, signs, its RNG use) is torchattacks' own. What
    changes is what it reads from the model: `margin_and_loss` averages the margin ``z_y - max_{j!=y} z_j``
    over ``eot_samples`` separate forward passes, and torchattacks uses it both to accept a candidate
    (lower mean margin) and to stop on an example (mean margin <= 0). `perturb` (the restart loop) also
    decides with the mean margin: which examples to attack (mean margin > 0 at x), which restarts
    fooled the model, and what to return: per example the point with the lowest re-measured mean margin
    among x and the restarts' results. With one sample on a deterministic model this is exactly
    torchattacks' Square: same examples attacked, same random draws, same output wherever it fooled the
    model (elsewhere both outputs are classified correctly).
    """
    cls = _EOT_SQUARE.get(id(ta))
    if cls is not None:
        return cls

    class EOTSquare(ta.Square):
        def __init__(self, model, *, eot_samples: int, **kw):
            super().__init__(model, **kw)
            self.eot_samples = eot_samples

        def mean_margin(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            total = None
            rows = torch.arange(x.shape[0], device=x.device)
            for _ in range(self.eot_samples):
                logits = self.get_logits(x)
                own = logits[rows, y].clone()
                logits[rows, y] = -float("inf")
                margin = own - logits.max(dim=-1)[0]
                total = margin if total is None else total + margin
            return total if self.eot_samples == 1 else total / self.eot_samples

        def margin_and_loss(self, x, y):
            m = self.mean_margin(x, y)
            return m, m

        def perturb(self, x, y=None):
            self.init_hyperparam(x)
            y = y.detach().clone().long().to(self.device)
            adv = x.clone()
            with torch.no_grad():
                best = self.mean_margin(x, y)
            torch.random.manual_seed(self.seed)
            torch.cuda.random.manual_seed(self.seed)
            for _ in range(self.n_restarts):
                idx = (best > 0).nonzero().flatten()
                if idx.numel() == 0:
                    break
                _, adv_curr = self.attack_single_run(x[idx].clone(), y[idx].clone())
                with torch.no_grad():
                    m = self.mean_margin(adv_curr, y[idx])
                better = m < best[idx]
                adv[idx[better]] = adv_curr[better].clone()
                best[idx[better]] = m[better]
            return adv

    _EOT_SQUARE[id(ta)] = EOTSquare
    return EOTSquare


def eot_square_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    eps: float = 8 / 255,
    norm: Norm = "linf",
    n_queries: int = 5000,
    eot_samples: int = 4,
    p_init: float = 0.8,
    restarts: int = 1,
    seed: int = 0,
    targets: Targets = "labels",
    mode: Mode = "eval",
) -> torch.Tensor:
    """EOT-Square: the Square attack judging every candidate by its margin averaged over m noisy passes.

    Plain Square on a randomized model accepts a candidate when one lucky noisy pass gives it a lower
    margin and stops on an example as soon as one pass misclassifies it, so it mostly follows the
    noise. Here the acceptance test (lower mean margin), the stopping rule (mean margin <= 0) and the
    restarts' verdicts use the margin ``z_y - max_{j!=y} z_j`` averaged over ``eot_samples`` = m
    separate forward passes; per example the point with the lowest mean margin found is returned.
    Each of the ``n_queries`` iterations costs m forward passes. m=1 on a deterministic model is
    torchattacks' Square (see `square_attack`). Needs ``pip install --no-deps torchattacks``;
    other arguments as in `square_attack`.
    """
    eps = check_real("eps", eps)
    check_int("n_queries", n_queries, 1)
    check_int("eot_samples", eot_samples, 1)
    p_init = check_real("p_init", p_init, positive=True, maximum=1)
    check_int("restarts", restarts, 1)
    check_int("seed", seed, 0)
    kw = dict(
        norm=_ta_norm(norm), eps=eps, n_queries=n_queries, n_restarts=restarts, p_init=p_init, seed=seed, loss="margin"
    )

    def build(ta, m):
        return _eot_square_class(ta)(m, eot_samples=eot_samples, **kw)

    return _run_torchattack(model, x, y, eps=eps, norm=norm, targets=targets, mode=mode, build=build)
