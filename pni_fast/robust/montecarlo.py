"""Monte-Carlo prediction for randomized (PNI) models: the mean softmax over k noisy passes.

One noisy pass is one sample of a PNI model's answer; `predict` averages the class probabilities
of ``samples`` = k separate forward passes (each draws fresh noise) and `accuracy_vs_samples`
measures how the accuracy of that prediction grows with k, on clean data or under an attack, so
that the k a deployment needs is a measured number (docs/evaluation.md has the demo model's curve).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .checks import WrongTypeError, check_int
from .modes import Mode, attack_mode

__all__ = ["predict", "accuracy_vs_samples", "SamplesCurve"]


def _check_x(model: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = type(x).__name__ if not isinstance(x, torch.Tensor) else f"tensor of dtype {x.dtype}"
        raise TypeError(f"x must be a floating-point tensor, got {what}")
    if x.dim() < 1:
        raise ValueError("x must be a batch [N, ...], got a 0-d tensor")


def _draws(model: nn.Module, x: torch.Tensor, samples: int):
    """Softmax probabilities of ``samples`` separate noisy passes over the whole batch, one at a time."""
    for i in range(samples):
        logits = model(x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"model must map x [N, ...] to logits [N, classes], got {tuple(logits.shape)} for N={x.shape[0]}"
            )
        yield i, torch.softmax(logits.float(), dim=1)


def predict(
    model: nn.Module,
    x: torch.Tensor,
    samples: int = 10,
    *,
    return_draws: bool = False,
    mode: Mode = "eval",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Monte-Carlo prediction: class probabilities averaged over ``samples`` = k noisy forward passes.

    Each pass runs the whole batch once (PNI-W noise is shared by a batch, so copies of an input inside one
    batch are not independent draws; separate passes are). No gradients; the model runs in eval mode by
    default (``mode="current"`` keeps its mode) and its modes and buffers are restored afterwards. A model
    without noise gives its own softmax for every k.

    Args:
        x: a batch [N, ...].
        samples: k >= 1, the number of noisy passes averaged.
        return_draws: also return each pass's predicted class.

    Returns:
        ``probs`` [N, classes] float32 (rows sum to 1; ``probs.argmax(1)`` is the prediction), or
        ``(probs, draws)`` with ``draws`` [k, N] int64, row i the argmax of pass i.
    """
    check_int("samples", samples, 1)
    if not isinstance(return_draws, bool):
        raise WrongTypeError(f"return_draws must be a bool, got {type(return_draws).__name__} {return_draws!r}")
    _check_x(model, x)
    total: Optional[torch.Tensor] = None
    preds = []
    with attack_mode(model, mode), torch.no_grad():
        for _, p in _draws(model, x.detach(), samples):
            total = p if total is None else total + p
            if return_draws:
                preds.append(p.argmax(1))
    probs = total / samples
    if return_draws:
        return probs, torch.stack(preds)
    return probs


@dataclass
class SamplesCurve:
    """Accuracy of the k-sample Monte-Carlo prediction for each k, over R repeats (fresh noise each)."""

    attack: str
    ks: list[int]
    accuracies: dict[int, list[float]]  # k -> R values
    n_examples: int
    mean: dict[int, float] = field(init=False)
    std: dict[int, float] = field(init=False)

    def __post_init__(self) -> None:
        from .evaluate import mean_std

        self.mean, self.std = {}, {}
        for k in self.ks:
            self.mean[k], self.std[k] = mean_std(self.accuracies[k])

    def format(self) -> str:
        """Two lines: k and accuracy (mean +/- std in %)."""
        head = "k          " + "".join(f"{k:>13d}" for k in self.ks)
        row = "accuracy % " + "".join(f"{100 * self.mean[k]:6.1f} +/-{100 * self.std[k]:4.1f}" for k in self.ks)
        title = f"{self.attack}: Monte-Carlo prediction (mean softmax over k noisy passes), {self.n_examples} images"
        return f"{title}\n{head}\n{row}"


def accuracy_vs_samples(
    model: nn.Module,
    data,
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32),
    *,
    attack=None,
    repeats: int = 5,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
) -> SamplesCurve:
    """Accuracy of `predict` with ``samples=k`` for each k in ``ks``, mean +/- std over ``repeats``.

    In each repeat every batch is (optionally) attacked with ``attack`` (an `AttackSpec`; None or
    ``AttackSpec("clean")`` for clean data), then classified by max(ks) noisy passes; the prediction for k
    is the argmax of the mean softmax of the first k of them, so one repeat measures every k on the same
    draws. ``data`` as in `evaluate` (a `Split`, an (x, y) pair or a re-iterable of batches).
    """
    from .evaluate import AttackSpec, batches

    ks = sorted({check_int("k", k, 1) for k in ks})
    if not ks:
        raise ValueError("ks must hold at least one k >= 1")
    check_int("repeats", repeats, 1)
    check_int("batch_size", batch_size, 1)
    spec = AttackSpec("clean") if attack is None else attack
    if not isinstance(spec, AttackSpec):
        raise TypeError(f"attack must be an AttackSpec or None, got {type(spec).__name__}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    accs: dict[int, list[float]] = {k: [] for k in ks}
    n = 0
    with attack_mode(model, "eval"):
        for _ in range(repeats):
            gen = torch.Generator(device="cpu").manual_seed(spec.seed)
            correct = dict.fromkeys(ks, 0)
            seen = 0
            for xb, yb in batches(data, batch_size, device):
                xa = spec.run(model, xb, yb, gen)
                total = None
                with torch.no_grad():
                    for i, p in _draws(model, xa, ks[-1]):
                        total = p if total is None else total + p
                        if i + 1 in correct:
                            correct[i + 1] += int((total.argmax(1) == yb).sum().item())
                seen += int(yb.shape[0])
            if seen == 0:
                raise ValueError("data holds no examples")
            n = seen
            for k in ks:
                accs[k].append(correct[k] / seen)
    return SamplesCurve(spec.name, ks, accs, n)
