"""Accuracy under attack for randomized (PNI) and deterministic models.

A PNI model answers differently on every forward pass, so one accuracy number
is a sample, not a measurement. `evaluate` repeats each evaluation R times
(fresh noise each time) and reports mean +/- std, with every attack setting
recorded next to the number (design.md section 7).

What the std measures: the attack's own randomness (PGD's random start, the
random starts and searches of AutoAttack-rand and Square) is seeded with the
spec's fixed seed in every repeat, so the spread comes from the model's noise
alone; a deterministic model gets std exactly 0.

Worst-of-k: a noisy model can classify one adversarial example correctly on one
pass and wrongly on the next. Next to the mean (each attacked example classified
by one noisy pass), every result carries the worst-of-k accuracy: the attacked
example is classified by k noisy passes (``worst_of=k``, default 10; the first is
the pass behind the mean) and counts as correct only if all k are correct. It
applies to every attack and to clean accuracy, so AutoAttack-rand's final
verdict is re-evaluated over k draws too. A deterministic model gets the same
number twice; for a randomized one, worst-of-k <= mean in every repeat.

Randomized defenses are judged with AutoAttack's ``rand`` version (APGD-CE +
APGD-DLR with EOT), the gradient-free Square attack and EOT-Square (Square
deciding on the margin averaged over m noisy passes), next to PGD and EOT-PGD;
the last three run through torchattacks, an optional dependency.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Optional, Union

import torch
from torch import nn

from . import attacks as _attacks
from . import interop as _interop
from .attacks import NORMS, TARGETS
from .checks import check_choice, check_int, check_real
from .data import Split, to_unit_float
from .modes import model_mode

__all__ = ["AttackSpec", "EvalResult", "evaluate", "format_results", "accuracy"]

_KINDS = ("clean", "fgsm", "pgd", "eot-pgd", "cw", "autoattack-rand", "square", "eot-square")
WORST_OF = 10  # evaluate's default k: noisy passes behind the worst-of-k accuracy


def _fmt_eps(v: float) -> str:
    """8/255 instead of 0.0313725... where the value is a small multiple of 1/255."""
    f = Fraction(v).limit_denominator(255)
    if f.denominator == 255 and abs(float(f) - v) < 1e-9:
        return f"{f.numerator}/255"
    return f"{v:g}"


@dataclass(frozen=True)
class AttackSpec:
    """One attack with all of its settings; ``kind`` in clean, fgsm, pgd, eot-pgd, cw, autoattack-rand, square,
    eot-square.

    ``seed`` seeds the attack's own randomness, the same in every repeat (PGD: the generator of the
    random start; autoattack-rand and square: torchattacks' seed). autoattack-rand uses ``steps``,
    ``restarts`` and ``eot_samples`` (>= 2; AutoAttack uses 100 steps x 20 samples); square uses
    ``n_queries``, ``p_init`` and ``restarts``; eot-square those and ``eot_samples`` (m >= 2, the noisy
    passes behind each margin). These three need ``pip install torchattacks`` and image batches [N, C, H, W].
    """

    kind: str = "pgd"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 7
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1
    eot_samples: int = 1
    targets: str = "labels"
    cw_c: float = 1.0
    cw_kappa: float = 0.0
    cw_lr: float = 0.01
    cw_steps: int = 100
    cw_search_steps: int = 5
    n_queries: int = 5000
    p_init: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, _KINDS)
        if self.kind == "eot-pgd" and self.eot_samples < 2:
            raise ValueError(f"eot-pgd needs eot_samples >= 2, got {self.eot_samples}")
        if self.kind == "eot-square" and self.eot_samples < 2:
            raise ValueError(
                f"eot-square needs eot_samples >= 2 (m noisy passes per margin; m=1 is kind='square'), "
                f"got {self.eot_samples}"
            )
        if self.kind == "autoattack-rand" and self.eot_samples < 2:
            raise ValueError(
                f"autoattack-rand needs eot_samples >= 2 (AutoAttack's rand version uses 20), got {self.eot_samples}"
            )
        check_int("n_queries", self.n_queries, 1)
        check_real("p_init", self.p_init, positive=True, maximum=1)
        check_choice("targets", self.targets, TARGETS)
        check_choice("norm", self.norm, NORMS)

    @property
    def name(self) -> str:
        """Short column title, e.g. 'PGD-7' or 'EOT-PGD-7x8'."""
        if self.kind == "clean":
            return "clean"
        if self.kind == "fgsm":
            return "FGSM"
        if self.kind == "cw":
            return "CW-L2"
        if self.kind == "autoattack-rand":
            return f"AA-rand-{self.steps}x{self.eot_samples}"
        if self.kind == "square":
            return f"Square-{self.n_queries}"
        if self.kind == "eot-square":
            return f"EOT-Square-{self.n_queries}x{self.eot_samples}"
        base = f"PGD-{self.steps}"
        return f"EOT-{base}x{self.eot_samples}" if self.kind == "eot-pgd" else base

    def describe(self) -> str:
        """Every setting in one line, printed next to results."""
        if self.kind == "clean":
            return "clean: no attack"
        if self.kind == "cw":
            return (
                f"CW-L2 (unbounded, smallest L2 found): c={self.cw_c:g} (binary search {self.cw_search_steps}), "
                f"kappa={self.cw_kappa:g}, steps={self.cw_steps}, lr={self.cw_lr:g}, targets={self.targets}"
            )
        norm = "Linf" if self.norm == "linf" else "L2"
        eps = _fmt_eps(self.eps) if self.norm == "linf" else f"{self.eps:g}"
        if self.kind == "fgsm":
            return f"FGSM: {norm} eps={eps}, targets={self.targets}" + (
                f", EOT samples={self.eot_samples}" if self.eot_samples > 1 else ""
            )
        if self.kind == "autoattack-rand":
            return (
                f"{self.name}: AutoAttack rand version (APGD-CE, then APGD-DLR on the rest; torchattacks): {norm} "
                f"eps={eps}, steps={self.steps}, restarts={self.restarts}, EOT samples={self.eot_samples}, "
                f"seed={self.seed}, targets={self.targets}"
            )
        if self.kind == "square":
            return (
                f"{self.name}: Square (gradient-free, margin loss; torchattacks): {norm} eps={eps}, "
                f"queries={self.n_queries}, p_init={self.p_init:g}, restarts={self.restarts}, seed={self.seed}, "
                f"targets={self.targets}"
            )
        if self.kind == "eot-square":
            return (
                f"{self.name}: EOT-Square (Square whose acceptance test, stopping rule and restart verdicts use the "
                f"margin averaged over m={self.eot_samples} noisy passes; torchattacks' search): {norm} eps={eps}, "
                f"queries={self.n_queries} (x{self.eot_samples} forward passes), p_init={self.p_init:g}, "
                f"restarts={self.restarts}, seed={self.seed}, targets={self.targets}"
            )
        step = _fmt_eps(self.alpha) if self.norm == "linf" else f"{self.alpha:g}"
        return (
            f"{self.name}: {norm} eps={eps}, step={step}, steps={self.steps}, "
            f"random start={'yes' if self.random_start else 'no'}, restarts={self.restarts}, "
            f"EOT samples={self.eot_samples}, targets={self.targets}"
        )

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """The adversarial batch for (x, y); clean returns x."""
        if self.kind == "clean":
            return x
        if self.kind == "fgsm":
            return _attacks.fgsm(model, x, y, eps=self.eps, targets=self.targets, eot_samples=self.eot_samples)
        if self.kind == "cw":
            return _attacks.carlini_wagner_l2(
                model,
                x,
                y,
                c=self.cw_c,
                kappa=self.cw_kappa,
                steps=self.cw_steps,
                lr=self.cw_lr,
                search_steps=self.cw_search_steps,
                targets=self.targets,
            )
        if self.kind == "autoattack-rand":
            return _interop.autoattack_rand(
                model,
                x,
                y,
                eps=self.eps,
                norm=self.norm,
                steps=self.steps,
                eot_samples=self.eot_samples,
                restarts=self.restarts,
                seed=self.seed,
                targets=self.targets,
            )
        if self.kind == "eot-square":
            return _interop.eot_square_attack(
                model,
                x,
                y,
                eps=self.eps,
                norm=self.norm,
                n_queries=self.n_queries,
                eot_samples=self.eot_samples,
                p_init=self.p_init,
                restarts=self.restarts,
                seed=self.seed,
                targets=self.targets,
            )
        if self.kind == "square":
            return _interop.square_attack(
                model,
                x,
                y,
                eps=self.eps,
                norm=self.norm,
                n_queries=self.n_queries,
                p_init=self.p_init,
                restarts=self.restarts,
                seed=self.seed,
                targets=self.targets,
            )
        return _attacks.pgd(
            model,
            x,
            y,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            restarts=self.restarts,
            targets=self.targets,
            eot_samples=self.eot_samples,
            generator=generator,
        )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = float(statistics.fmean(values)) if values else math.nan
    return mean, float(statistics.pstdev(values)) if len(values) > 1 else 0.0


@dataclass
class EvalResult:
    """Accuracy of one attack over R noisy evaluations, with the attack's settings.

    ``accuracies[r]``: repeat r's accuracy, each attacked example classified by one noisy pass;
    ``worst_accuracies[r]``: repeat r's worst-of-k accuracy (``worst_of`` = k passes, all correct). Without
    ``worst_accuracies`` (k = 1) the two are the same. ``mean``/``std`` and ``worst``/``worst_std`` summarize them.
    """

    attack: str
    settings: dict[str, object]
    description: str
    accuracies: list[float]
    n_examples: int
    worst_accuracies: Optional[list[float]] = None
    worst_of: int = 1
    mean: float = field(init=False)
    std: float = field(init=False)
    worst: float = field(init=False)
    worst_std: float = field(init=False)

    def __post_init__(self) -> None:
        if self.worst_accuracies is None:
            if self.worst_of != 1:
                raise ValueError(f"worst_accuracies is required when worst_of={self.worst_of} > 1")
            self.worst_accuracies = list(self.accuracies)
        if len(self.worst_accuracies) != len(self.accuracies):
            raise ValueError(
                f"worst_accuracies has {len(self.worst_accuracies)} values for {len(self.accuracies)} repeats"
            )
        self.mean, self.std = mean_std(self.accuracies)
        self.worst, self.worst_std = mean_std(self.worst_accuracies)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f} +/- {100 * self.std:.1f}"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correct argmax predictions in one forward pass (no grad)."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean().item())


Data = Union[Split, tuple[torch.Tensor, torch.Tensor], Iterable]


def _in_memory(data: Data) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) for a `Split` or a pair of tensors, else None (an iterable of batches)."""
    if isinstance(data, Split):
        return data.x, data.y
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data
    return None


def batches(data: Data, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``data``: batches moved to ``device`` one at a time (nothing is held)."""
    pair = _in_memory(data)
    if pair is not None:
        x, y = pair
        for s in range(0, x.shape[0], batch_size):
            yield to_unit_float(x[s : s + batch_size]).to(device), y[s : s + batch_size].to(device)
        return
    for i, batch in enumerate(data):
        try:
            xb, yb = batch
        except (TypeError, ValueError):
            raise TypeError(f"data must yield (x, y) batches, got {type(batch).__name__} as batch {i}") from None
        if not isinstance(xb, torch.Tensor) or not isinstance(yb, torch.Tensor):
            raise TypeError(
                f"data must yield (x, y) batches of tensors, got ({type(xb).__name__}, {type(yb).__name__}) "
                f"as batch {i}"
            )
        if yb.is_floating_point() or yb.dim() != 1 or xb.dim() < 2 or yb.shape[0] != xb.shape[0]:
            raise ValueError(
                f"data batch {i}: expected x [N, ...] and integer labels y [N], got x {tuple(xb.shape)} and "
                f"y {yb.dtype} {tuple(yb.shape)}"
            )
        yield to_unit_float(xb).to(device), yb.to(device)


def evaluate(
    model: nn.Module,
    data: Data,
    attacks: Sequence[AttackSpec] = (AttackSpec("clean"), AttackSpec("pgd")),
    *,
    repeats: int = 5,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
    worst_of: int = WORST_OF,
    on_attack: Optional[Callable[[EvalResult, int, int], None]] = None,
) -> list[EvalResult]:
    """Accuracy of ``model`` on ``data`` under each attack, repeated ``repeats`` times.

    The model runs in eval mode (PNI noise stays on unless switched off by the
    caller), attacks included, and every submodule's mode is restored afterwards. In each repeat every batch is
    attacked afresh and the adversarial batch is classified by ``worst_of`` = k more noisy
    forward passes: the first gives the accuracy behind mean +/- std, all k together the
    worst-of-k accuracy (an example counts as correct only if all k passes classify it
    correctly). Batches are streamed: one is on the device at a time.

    Args:
        data: a `Split` or an (x, y) pair of tensors (cut into ``batch_size`` batches), or a re-iterable of
            (x, y) batches such as a list or a ``DataLoader`` (its own batching is kept). It is read once per
            attack and repeat, so a one-shot iterator (a generator) is refused. A DataLoader draws a seed from
            torch's default generator on every pass unless it is given ``generator=``; that shifts the noise
            stream (not the validity) relative to the same batches held in memory.
        attacks: AttackSpec list; ``AttackSpec("clean")`` for clean accuracy.
        on_attack: called as ``on_attack(result, i, len(attacks))`` after attack ``i`` (0-based) finished:
            the CLI prints a progress line with it.
        repeats: R, the number of noisy evaluations behind mean +/- std.
        worst_of: k, the noisy passes that classify each attacked example for the worst-of-k accuracy
            (default 10; 1 leaves it equal to the mean). They cost k forward passes per batch, little next to
            an attack.
    """
    check_int("repeats", repeats, 1)
    check_int("worst_of", worst_of, 1)
    check_int("batch_size", batch_size, 1)
    for a in attacks:
        if not isinstance(a, AttackSpec):
            raise TypeError(f"attacks must hold AttackSpec objects, got {type(a).__name__}")
    pair = _in_memory(data)
    if pair is None:
        try:
            it = iter(data)
        except TypeError:
            raise TypeError(
                "data must be a Split, an (x, y) pair of tensors or an iterable of (x, y) batches, "
                f"got {type(data).__name__}"
            ) from None
        if it is data:
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}); evaluate reads it once per attack and repeat: "
                "pass a list of batches, a DataLoader or another re-iterable"
            )
    elif pair[0].shape[0] == 0:
        raise ValueError("data holds no examples")
    elif pair[1].shape != pair[0].shape[:1]:
        raise ValueError(f"data: y must have shape [{pair[0].shape[0]}] to match x, got {tuple(pair[1].shape)}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)

    results = []
    n: Optional[int] = None
    with model_mode(model, "eval"):
        for spec in attacks:
            accs, worst_accs = [], []
            for _ in range(repeats):
                gen = torch.Generator(device="cpu").manual_seed(spec.seed)
                correct = all_correct = seen = 0
                for xb, yb in batches(data, batch_size, device):
                    xa = spec.run(model, xb, yb, gen)
                    with torch.no_grad():
                        ok = model(xa).argmax(1) == yb
                        correct += int(ok.sum().item())
                        for _ in range(worst_of - 1):
                            ok &= model(xa).argmax(1) == yb
                        all_correct += int(ok.sum().item())
                    seen += int(yb.shape[0])
                if n is None:
                    if seen == 0:
                        raise ValueError("data holds no examples")
                    n = seen
                elif seen != n:
                    raise ValueError(
                        f"data gave {n} examples on one pass and {seen} on another; evaluate needs the same "
                        "examples on every pass (a DataLoader with drop_last or a changing sampler?)"
                    )
                accs.append(correct / n)
                worst_accs.append(all_correct / n)
            settings = asdict(spec)
            results.append(EvalResult(spec.name, settings, spec.describe(), accs, n, worst_accs, worst_of))
            if on_attack is not None:
                on_attack(results[-1], len(results) - 1, len(attacks))
    return results


def format_results(
    rows: dict[str, list[EvalResult]], repeats: Optional[int] = None, worst: Optional[bool] = None
) -> str:
    """A plain-text table: one row per model; per attack a column 'mean +/- std' in % and, when any result was
    classified over k > 1 noisy passes (or ``worst=True``), a column 'worst-k' with the worst-of-k accuracy;
    the definitions and every attack's settings are printed under it."""
    if not rows:
        return "(no results)"
    first = next(iter(rows.values()))
    ks = sorted({r.worst_of for v in rows.values() for r in v})
    show_worst = ks != [1] if worst is None else bool(worst)
    worst_title = f"worst-{ks[0]}" if len(ks) == 1 else "worst-k"
    cols: list[str] = []
    for r in first:
        cols.append(r.attack)
        if show_worst:
            cols.append(worst_title)
    name_w = max(len("model"), *(len(k) for k in rows))
    cells: dict[str, list[str]] = {}
    for k, v in rows.items():
        cells[k] = []
        for r in v:
            cells[k].append(f"{100 * r.mean:5.1f} +/- {100 * r.std:4.1f}")
            if show_worst:
                cells[k].append(f"{100 * r.worst:5.1f}")
    col_w = [max(len(c), *(len(cells[k][i]) for k in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(["model".ljust(name_w)] + [c.rjust(w) for c, w in zip(cols, col_w)])]
    lines.append("  ".join(["-" * name_w] + ["-" * w for w in col_w]))
    for k in rows:
        lines.append("  ".join([k.ljust(name_w)] + [c.rjust(w) for c, w in zip(cells[k], col_w)]))
    rs = {k: len(v[0].accuracies) for k, v in rows.items()}
    lines.append("")
    if repeats is not None or len(set(rs.values())) == 1:
        r = repeats if repeats is not None else next(iter(rs.values()))
        lines.append(f"accuracy in % on {first[0].n_examples} test images, mean +/- std over R={r} noisy evaluations")
    else:
        per = ", ".join(f"{k}: R={v}" for k, v in rs.items())
        lines.append(
            f"accuracy in % on {first[0].n_examples} test images, mean +/- std over R noisy evaluations "
            f"({per}; a model without noise gives the same answer every time, so R=1 and std 0 for it)"
        )
    if show_worst:
        k = str(ks[0]) if len(ks) == 1 else "k"
        lines.append(
            f"{worst_title}: worst-of-{k} accuracy (mean over R): an attacked example counts as correct only if all "
            f"{k} noisy passes that classify it are correct"
        )
        lines.append(
            "  (the first of them gives mean +/- std); for clean accuracy and every attack, AA-rand's final verdict "
            "included; a model without noise scores the same in both"
        )
    for res in first:
        lines.append(f"  {res.description}")
    return "\n".join(lines)
