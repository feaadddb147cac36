"""White-box attacks for classifiers that take images in [0, 1].

PNI is a randomized defense, so every attack here is written for models whose
forward pass is random: `eot_pgd` averages the input gradient over K separate
forward passes (each pass draws fresh noise; copies of an input inside one
batch are *not* independent draws, because PNI-W noise is shared by the whole
batch). All attacks:

- work on any ``nn.Module`` mapping ``[N, ...]`` inputs to ``[N, classes]``
  logits, on any device;
- never modify the caller's tensors and return a new, detached tensor;
  refuse inputs outside [0, 1] and NaN/Inf inputs with a ValueError;
- attack the model in **eval mode by default** (``mode="eval"``, as
  torchattacks does): BatchNorm uses its running statistics, so a model left in
  train mode is attacked as the same function it computes in eval. PNI noise
  stays on in eval (that is PNI's defense); switch it off with
  ``pni_fast.no_noise`` if you want a deterministic model. ``mode="current"``
  attacks the model in whatever mode it is in, ``mode="train"`` in train mode;
- leave the model as they found it, also when they raise: the train/eval flag
  of every submodule, the ``requires_grad`` flag of every parameter
  (parameters are frozen during the attack so no gradient leaks into
  ``param.grad``) and every buffer (BatchNorm running statistics are put back
  even if a ``"train"``/``"current"`` attack ran train-mode forwards).

AutoAttack-rand, Square and EOT-Square (through torchattacks) live in `pni_fast.robust.interop`
under the same rules; they are re-exported here.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_choice, check_int, check_real
from .modes import Mode, attack_mode

__all__ = [
    "fgsm",
    "pgd",
    "eot_pgd",
    "carlini_wagner_l2",
    "resolve_targets",
]

Norm = Literal["linf", "l2"]
Targets = Literal["labels", "predictions"]

NORMS = ("linf", "l2")
TARGETS = ("labels", "predictions")


# --------------------------------------------------------------------------- #
# argument checks
# --------------------------------------------------------------------------- #
def check_inputs(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [N, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if x.numel() > 0:
        finite = torch.isfinite(x.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum().item())
            raise ValueError(f"x must be finite, got {bad} NaN/Inf value(s) in a tensor of shape {tuple(x.shape)}")
        lo, hi = torch.aminmax(x.detach())
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(
                f"x must lie in [0, 1] (attacks clip to that box), got min {lo.item():.4g} max {hi.item():.4g}"
            )
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"y must be an integer tensor of class indices, got dtype {y.dtype}")
        if y.shape != x.shape[:1]:
            raise ValueError(f"y must have shape [N] = {tuple(x.shape[:1])} to match x, got {tuple(y.shape)}")


def resolve_targets(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], targets: Targets) -> torch.Tensor:
    """Labels the attack moves away from: the true labels, or the model's own predictions.

    Using predictions (as the PNI paper does) avoids label leaking; for a noisy
    model the prediction comes from one noisy forward pass.
    """
    check_choice("targets", targets, TARGETS)
    if targets == "labels":
        if y is None:
            raise ValueError(
                "y (true labels) is required when targets='labels'; pass targets='predictions' to attack the "
                "model's own predictions"
            )
        return y.to(device=x.device, dtype=torch.long)
    with torch.no_grad():
        return model(x).argmax(dim=1)


def _input_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor, samples: int = 1) -> torch.Tensor:
    """Gradient of the summed cross-entropy wrt x, averaged over `samples` separate forward passes."""
    total = None
    for _ in range(samples):
        xr = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xr), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, xr)
        total = g if total is None else total + g
    return total / samples if samples > 1 else total


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against t."""
    n = t.flatten(1).norm(p=2, dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


def _rand_like(x: torch.Tensor, generator: Optional[torch.Generator], kind: str) -> torch.Tensor:
    """Uniform [0,1) or standard normal noise for random starts, optionally from a given generator."""
    if generator is None:
        return torch.rand_like(x) if kind == "uniform" else torch.randn_like(x)
    gen_dev = generator.device
    fn = torch.rand if kind == "uniform" else torch.randn
    out = fn(x.shape, generator=generator, dtype=x.dtype, device=gen_dev)
    return out.to(x.device)


def _project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _random_start(x: torch.Tensor, eps: float, norm: Norm, generator: Optional[torch.Generator]) -> torch.Tensor:
    if norm == "linf":
        delta = (2 * _rand_like(x, generator, "uniform") - 1) * eps
    else:
        # uniform direction, radius uniform in [0, eps]
        d = _rand_like(x, generator, "normal")
        d = d / _per_example_norm(d).clamp_min(1e-12)
        r = _rand_like(x[:, :1].flatten(1)[:, :1], generator, "uniform").view(-1, *([1] * (x.dim() - 1)))
        delta = d * r * eps
    return (x + delta).clamp(0.0, 1.0) - x


# --------------------------------------------------------------------------- #
# attacks
# --------------------------------------------------------------------------- #
def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    eps: float = 8 / 255,
    targets: Targets = "labels",
    eot_samples: int = 1,
    mode: Mode = "eval",
) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one L-inf step of size eps.

    Args:
        eot_samples: average the gradient over this many forward passes (EOT).
        mode: "eval" (default), "current" or "train": the model's mode during
            the attack (see `pgd`); restored afterwards.
    Returns:
        Adversarial inputs in [0, 1] with ``|x_adv - x|_inf <= eps``.
    """
    eps = check_real("eps", eps)
    check_int("eot_samples", eot_samples, 1)
    check_inputs(model, x, y)
    with attack_mode(model, mode):
        target = resolve_targets(model, x, y, targets)
        if x.numel() == 0 or eps == 0:
            return x.detach().clone()
        g = _input_grad(model, x, target, eot_samples)
        return (x.detach() + eps * g.sign()).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 7,
    norm: Norm = "linf",
    random_start: bool = True,
    restarts: int = 1,
    targets: Targets = "labels",
    eot_samples: int = 1,
    mode: Mode = "eval",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al. 2018), L-inf or L2, with restarts.

    Each step moves by ``alpha`` along sign(grad) (L-inf) or grad/|grad|_2 (L2),
    then projects back onto the eps-ball around x and the [0, 1] box. With
    several restarts each example keeps the restart that fools the model, or
    failing that the one with the highest loss.

    Args:
        eps: radius of the ball (L-inf: per pixel; L2: per example).
        alpha: step size.
        steps: gradient steps per restart.
        random_start: start each restart from a random point of the ball.
        restarts: independent runs; the best per example is returned.
        targets: "labels" (needs y) or "predictions" (the model's own argmax).
        eot_samples: forward passes averaged per gradient (EOT); see eot_pgd.
        mode: "eval" (default) attacks the model in eval mode (noise stays on),
            "current" in the mode it is in, "train" in train mode; the mode
            and all buffers are restored afterwards.
        generator: torch.Generator for the random start (the model's own noise
            is not affected), for reproducible attacks.
    """
    eps = check_real("eps", eps)
    alpha = check_real("alpha", alpha, positive=True)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)
    check_int("eot_samples", eot_samples, 1)
    check_choice("norm", norm, NORMS)
    check_bool("random_start", random_start)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_inputs(model, x, y)

    x0 = x.detach()
    with attack_mode(model, mode):
        target = resolve_targets(model, x0, y, targets)
        if x0.numel() == 0 or eps == 0:
            return x0.clone()
        best = None
        best_fooled = best_loss = None
        for _ in range(restarts):
            delta = _random_start(x0, eps, norm, generator) if random_start else torch.zeros_like(x0)
            for _ in range(steps):
                g = _input_grad(model, x0 + delta, target, eot_samples)
                if norm == "linf":
                    step = g.sign()
                else:
                    step = g / _per_example_norm(g).clamp_min(1e-12)
                delta = _project(delta + alpha * step, eps, norm)
                delta = (x0 + delta).clamp(0.0, 1.0) - x0
            x_adv = (x0 + delta).detach()
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                loss = F.cross_entropy(logits, target, reduction="none")
                fooled = logits.argmax(1) != target
            if best is None:
                best, best_fooled, best_loss = x_adv.clone(), fooled, loss
                continue
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best[better] = x_adv[better]
            best_fooled = best_fooled | fooled
            best_loss = torch.where(better, loss, best_loss)
        return best


def eot_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    eot_samples: int = 8,
    **pgd_kwargs,
) -> torch.Tensor:
    """PGD with Expectation over Transformation (Athalye et al. 2018) for randomized models.

    Every step averages the input gradient over ``eot_samples`` separate
    forward/backward passes of the whole batch, so each sample sees a fresh
    noise draw. Accepts every keyword of `pgd` (the model is attacked in eval
    mode unless ``mode`` says otherwise).
    """
    return pgd(model, x, y, eot_samples=eot_samples, **pgd_kwargs)


def carlini_wagner_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
    search_steps: int = 5,
    targets: Targets = "labels",
    mode: Mode = "eval",
) -> torch.Tensor:
    """Carlini-Wagner L2 attack (untargeted), batched, with a binary search over c.

    Optimizes ``w`` with Adam where ``x_adv = (tanh(w) + 1) / 2`` stays in
    [0, 1]; minimizes ``|x_adv - x|_2^2 + c * max(Z_t - max_{i!=t} Z_i, -kappa)``.
    Per example, c is halved after a success and multiplied by 10 after a
    failure (bisected once both bounds are known). Returns, per example, the
    smallest-L2 adversarial input found, or x itself where none was found.
    ``mode`` is the model's mode during the attack, "eval" by default (see `pgd`).
    """
    c = check_real("c", c, positive=True)
    kappa = check_real("kappa", kappa)
    check_int("steps", steps, 1)
    check_int("search_steps", search_steps, 1)
    lr = check_real("lr", lr, positive=True)
    check_inputs(model, x, y)

    x0 = x.detach()
    with attack_mode(model, mode):
        target = resolve_targets(model, x0, y, targets)
        n = x0.shape[0]
        if n == 0:
            return x0.clone()
        best_adv = x0.clone()
        best_l2 = torch.full((n,), float("inf"), device=x0.device)
        const = torch.full((n,), c, device=x0.device, dtype=x0.dtype)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, float("inf"))
        # tanh-space start; shrink slightly so atanh stays finite at 0 and 1
        w0 = torch.atanh((x0 * 2 - 1) * (1 - 1e-6))
        for _ in range(search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x0.device)
            for _ in range(steps):
                x_adv = (torch.tanh(w) + 1) / 2
                logits = model(x_adv)
                l2 = (x_adv - x0).flatten(1).pow(2).sum(1)
                real = logits.gather(1, target[:, None]).squeeze(1)
                other = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")).amax(1)
                f = (real - other).clamp_min(-kappa)
                loss = (l2 + const * f).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    fooled = logits.argmax(1) != target
                    improve = fooled & (l2 < best_l2)
                    best_l2 = torch.where(improve, l2, best_l2)
                    best_adv[improve] = x_adv.detach()[improve]
                    succeeded |= fooled
            with torch.no_grad():
                upper = torch.where(succeeded, torch.minimum(upper, const), upper)
                lower = torch.where(succeeded, lower, torch.maximum(lower, const))
                bisect = (lower + upper) / 2
                const = torch.where(
                    torch.isfinite(upper),
                    bisect,
                    const * 10,
                )
        return best_adv
