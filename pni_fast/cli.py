"""Command line: ``python -m pni_fast {demo,train,eval,info,bench}``.

``demo`` is the one-command tour: on scikit-learn's bundled digits it trains a
small CNN three ways (plain; PGD adversarial training; PGD training + PNI-W
via `pni_fast.convert`), evaluates clean / PGD / EOT-PGD accuracy as
mean +/- std over R noisy evaluations, prints the table with every attack
setting, and saves a PNG (accuracy bars, alpha over epochs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["main", "build_parser", "DigitsCNN", "build_model", "run_demo"]

RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")
MODELS = ("digits_cnn",) + RESNETS
PNI_CHOICES = ("none", "layerwise", "channelwise", "elementwise")
NOISE_CHOICES = ("weight", "input", "both")


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers + BatchNorm + a linear classifier: big enough for 8x8 digits, fast on a CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(2 * w * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build_model(spec: Dict[str, Any]) -> nn.Module:
    """Rebuild a model from the ``model_spec`` stored in checkpoints."""
    arch = spec.get("arch")
    pni = spec.get("pni")
    pni = None if pni in (None, "none") else pni
    noise = spec.get("noise", "weight")
    num_classes = int(spec.get("num_classes", 10))
    if arch == "digits_cnn":
        model: nn.Module = DigitsCNN(int(spec.get("in_channels", 1)), num_classes, int(spec.get("width", 32)))
        if pni is not None:
            from .convert import convert

            model = convert(model, pni=pni, noise=noise)
        return model
    if arch in RESNETS:
        from . import models

        return getattr(models, arch)(num_classes=num_classes, pni=pni, noise=noise)
    raise ValueError(f"model_spec arch must be one of {MODELS}, got {arch!r}")


# --------------------------------------------------------------------------- #
# argument types
# --------------------------------------------------------------------------- #
def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_pos_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _fraction(s: str) -> float:
    """A non-negative number; accepts 8/255 style fractions."""
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            v = float(a) / float(b)
        else:
            v = float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number like 0.03 or 8/255, got {s!r}")
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def _pos_float(s: str) -> float:
    v = _fraction(s)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


# --------------------------------------------------------------------------- #
# parser
# --------------------------------------------------------------------------- #
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not when the help already names it or the default is None/False
    (a flag), and also for options written without a help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not text or "default" in text or default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return (text + " " if text else "") + "(default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)  # argparse prints nothing for help=None: show the default instead
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pni_fast",
        description="Parametric Noise Injection (PNI) with fused kernels: demo, training, evaluation, backends, benchmarks.",
        formatter_class=_HelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = _HelpFormatter

    d = sub.add_parser(
        "demo", formatter_class=fmt,
        help="train plain / PGD / PGD+PNI-W CNNs on the bundled digits and compare robustness (~30 s on 2 idle cores)",
        description="Train a small CNN on scikit-learn's bundled 8x8 digits three ways (plain, PGD adversarial "
        "training, PGD training + PNI-W via pni_fast.convert), then print clean / PGD / EOT-PGD accuracy "
        "(mean +/- std over R noisy evaluations) and save a PNG to --out. Needs no download.",
    )
    d.add_argument("--out", default="pni_demo_out",
                   help="output folder for results.json, the PNG and the logs (a re-run replaces its contents)")
    d.add_argument("--epochs", type=_pos_int, default=20, help="training epochs per model")
    d.add_argument("--warmup-epochs", type=_nonneg_int, default=2, help="clean epochs before PGD training starts")
    d.add_argument("--eps", type=_fraction, default=0.2, help="L-inf radius for training and evaluation (images in [0,1])")
    d.add_argument("--pgd-steps", type=_pos_int, default=10, help="PGD steps of the evaluation attacks (training uses 7)")
    d.add_argument("--eot-samples", type=_pos_int, default=8, help="EOT-PGD: forward passes averaged per gradient step")
    d.add_argument("--repeats", type=_pos_int, default=5, help="R: noisy evaluations behind each mean +/- std")
    d.add_argument("--pni", choices=PNI_CHOICES[1:], default="layerwise", help="alpha granularity of the PNI model")
    d.add_argument("--width", type=_pos_int, default=32, help="CNN width (channels of the first conv)")
    d.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (data order, init, noise)")
    d.add_argument("--threads", type=_pos_int, default=None, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--quick", action="store_true", help="tiny run in seconds (for tests): 2 epochs, 256 images")
    d.add_argument("--no-plot", action="store_true", help="skip the PNG")
    d.add_argument("--no-progress", action="store_true", help="no tqdm bars")

    t = sub.add_parser(
        "train", formatter_class=fmt, help="PGD adversarial training of a plain or PNI model (digits or CIFAR-10)",
        description="Train with the PNI paper's recipe (SGD Nesterov 0.9, lr 0.1 x0.1 at 50%/75%, batch 128, "
        "weight decay 3e-4 except alphas, clean warm-up, then PGD-7 eps 8/255 step 2/255, loss 0.5 clean + "
        "0.5 adversarial). Writes checkpoint.pt, history.json and metrics.csv to --out after every epoch.",
    )
    t.add_argument("--model", choices=MODELS, default="digits_cnn", help="architecture")
    t.add_argument("--dataset", choices=("digits", "cifar10"), default=None,
                   help="data set (default: cifar10 when --data-dir is given or the model is a ResNet, else digits)")
    t.add_argument("--data-dir", default=None, help="folder with CIFAR-10 python batches (data_batch_1..5, test_batch)")
    t.add_argument("--pni", choices=PNI_CHOICES, default="none", help="PNI alpha granularity; none = plain model")
    t.add_argument("--noise", choices=NOISE_CHOICES, default="weight", help="PNI on weights, layer inputs, or both")
    t.add_argument("--epochs", type=_pos_int, default=160, help="training epochs")
    t.add_argument("--batch-size", type=_pos_int, default=128, help="global batch (all processes together)")
    t.add_argument("--lr", type=_pos_float, default=0.1, help="initial learning rate (x0.1 at 50%% and 75%%)")
    t.add_argument("--momentum", type=_fraction, default=0.9, help="SGD Nesterov momentum")
    t.add_argument("--weight-decay", type=_fraction, default=3e-4, help="weight decay (never applied to alphas)")
    t.add_argument("--warmup-epochs", type=_nonneg_int, default=5, help="clean epochs before adversarial training")
    t.add_argument("--no-adv", action="store_true", help="plain training (no PGD)")
    t.add_argument("--eps", type=_fraction, default=8 / 255, help="PGD L-inf radius (accepts 8/255)")
    t.add_argument("--step", type=_pos_float, default=2 / 255, help="PGD step size")
    t.add_argument("--pgd-steps", type=_pos_int, default=7, help="PGD steps for training")
    t.add_argument("--targets", choices=("labels", "predictions"), default="labels", help="PGD targets")
    t.add_argument("--augment", choices=("auto", "yes", "no"), default="auto", help="crop+flip (auto: CIFAR only)")
    t.add_argument("--eval-samples", type=_nonneg_int, default=1000, help="test images checked after each epoch")
    t.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (data order, init, noise)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--out", default="pni_run",
                   help="output folder; one that holds another run is refused unless --resume or --overwrite")
    t.add_argument("--resume", default=None,
                   help="checkpoint file or folder to continue from (same noise stream); if it already holds "
                   "--epochs epochs, a note says so and the command exits 0 without training")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--limit-train", type=_pos_int, default=None, help="use only the first N training images")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    t.add_argument("--rank-noise", choices=("same", "independent"), default=None,
                   help="multi-process runs (torchrun --nproc_per_node N -m pni_fast train ...): 'same' (the default "
                   "under torchrun) = every rank draws the same PNI noise per step, so the step is one noisy model's "
                   "step over the global batch (equal to one process's); 'independent' = per-rank noise streams, N "
                   "noise samples per step for the alpha gradient, results depend on N. --batch-size is the global "
                   "batch. Given in a single process, that process uses the per-epoch noise streams of a "
                   "multi-process run (a reference run); not given, it keeps its usual stream")

    e = sub.add_parser(
        "eval", formatter_class=fmt, help="attack a checkpoint: clean / FGSM / PGD / EOT-PGD / CW accuracy, mean +/- std",
        description="Evaluate a checkpoint written by 'train' or 'demo' under attacks; reports mean +/- std over "
        "R noisy evaluations with every setting.",
    )
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its folder)")
    e.add_argument("--data-dir", default=None, help="CIFAR-10 folder (needed for CIFAR checkpoints)")
    e.add_argument("--attacks", default="clean,pgd,eot-pgd",
                   help="comma-separated from: clean, fgsm, pgd, eot-pgd, cw, autoattack-rand, square (the last two "
                   "need: pip install --no-deps torchattacks)")
    e.add_argument("--eps", type=_fraction, default=None, help="L-inf radius (default: the training eps)")
    e.add_argument("--step", type=_pos_float, default=None, help="PGD step (default: eps/4)")
    e.add_argument("--pgd-steps", type=_pos_int, default=20)
    e.add_argument("--restarts", type=_pos_int, default=1)
    e.add_argument("--eot-samples", type=_pos_int, default=8)
    e.add_argument("--targets", choices=("labels", "predictions"), default="labels")
    e.add_argument("--cw-c", type=_pos_float, default=1.0, help="CW: initial constant c (binary-searched)")
    e.add_argument("--cw-kappa", type=_fraction, default=0.0, help="CW: confidence margin kappa")
    e.add_argument("--cw-steps", type=_pos_int, default=100, help="CW: Adam steps per binary-search step")
    e.add_argument("--aa-steps", type=_pos_int, default=100, help="AutoAttack-rand: steps per APGD run")
    e.add_argument("--aa-eot-samples", type=_pos_int, default=20,
                   help="AutoAttack-rand: forward passes averaged per gradient (>= 2)")
    e.add_argument("--square-queries", type=_pos_int, default=5000, help="Square: queries per example and restart")
    e.add_argument("--square-p-init", type=_fraction, default=0.8, help="Square: initial fraction of pixels changed")
    e.add_argument("--repeats", type=_pos_int, default=5, help="R noisy evaluations")
    e.add_argument("--limit", type=_pos_int, default=None, help="evaluate only the first N test images")
    e.add_argument("--batch-size", type=_pos_int, default=256)
    e.add_argument("--no-noise", action="store_true", help="switch PNI noise off (deterministic model)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    sub.add_parser("info", help="show which kernel backends are active and why",
                   description="Print pni_fast.backends.info(): compiled extension, CUDA, Triton, fallbacks.")
    b = sub.add_parser("bench", help="run the benchmarks (benchmarks/run_all.py of a source checkout)", add_help=False,
                       description="Run benchmarks/run_all.py from the repository checkout; every argument, -h "
                       "included, is passed on (so `bench --help` shows run_all.py's options).")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/run_all.py")
    return p


# --------------------------------------------------------------------------- #
# commands
# --------------------------------------------------------------------------- #
def _eval_specs(names: Sequence[str], eps: float, step: float, steps: int, restarts: int, eot: int, targets: str,
                cw: Optional[Dict[str, Any]] = None, aa: Optional[Dict[str, Any]] = None,
                square: Optional[Dict[str, Any]] = None) -> list:
    from .evaluate import AttackSpec

    specs = []
    for n in names:
        if n == "clean":
            specs.append(AttackSpec("clean"))
        elif n == "fgsm":
            specs.append(AttackSpec("fgsm", eps=eps, targets=targets))
        elif n == "pgd":
            specs.append(AttackSpec("pgd", eps=eps, alpha=step, steps=steps, restarts=restarts, targets=targets))
        elif n == "eot-pgd":
            specs.append(AttackSpec("eot-pgd", eps=eps, alpha=step, steps=steps, restarts=restarts,
                                    eot_samples=max(2, eot), targets=targets))
        elif n == "cw":
            specs.append(AttackSpec("cw", targets=targets, **(cw or {})))
        elif n == "autoattack-rand":
            aa_kw = {"steps": steps, "eot_samples": max(2, eot), **(aa or {})}
            specs.append(AttackSpec("autoattack-rand", eps=eps, restarts=restarts, targets=targets, **aa_kw))
        elif n == "square":
            specs.append(AttackSpec("square", eps=eps, restarts=restarts, targets=targets, **(square or {})))
        else:
            raise ValueError(f"--attacks: unknown attack {n!r}; choose from clean, fgsm, pgd, eot-pgd, cw, "
                             "autoattack-rand, square")
    return specs


def run_demo(args: argparse.Namespace) -> Dict[str, Any]:
    """Train the three digits models, evaluate them, print the table, save results + plot."""
    from .convert import convert
    from .data import load_digits
    from .evaluate import evaluate, format_results
    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train_set, test_set = load_digits(seed=args.seed)
    epochs, warmup, steps, eot, repeats, width = (
        args.epochs, args.warmup_epochs, args.pgd_steps, args.eot_samples, args.repeats, args.width
    )
    if args.quick:
        train_set, test_set = train_set.subset(256), test_set.subset(64)
        epochs, warmup, steps, eot, repeats, width = 2, 1, 2, 2, 2, 8
    if warmup >= epochs:
        raise ValueError(f"--warmup-epochs ({warmup}) must be smaller than --epochs ({epochs})")
    os.makedirs(args.out, exist_ok=True)
    eps = args.eps
    base_cfg = dict(
        epochs=epochs, batch_size=128, warmup_epochs=warmup, adv_eps=eps, adv_alpha=eps / 4, adv_steps=7 if not args.quick else 2,
        seed=args.seed, eval_samples=len(test_set), eval_pgd_steps=min(steps, 5),
    )
    runs = [
        ("plain", TrainConfig(adversarial=False, **base_cfg), None),
        ("PGD-AT", TrainConfig(adversarial=True, **base_cfg), None),
        (f"PGD-AT + PNI-W ({args.pni})", TrainConfig(adversarial=True, **base_cfg), args.pni),
    ]
    specs = _eval_specs(["clean", "pgd", "eot-pgd"], eps, eps / 4, steps, 1, eot, "labels")
    table: Dict[str, list] = {}
    histories: Dict[str, list] = {}
    times: Dict[str, float] = {}
    for name, cfg, pni in runs:
        torch.manual_seed(args.seed)
        model: nn.Module = DigitsCNN(1, 10, width)
        if pni is not None:
            model = convert(model, pni=pni, noise="weight")
        spec = {"arch": "digits_cnn", "width": width, "in_channels": 1, "num_classes": 10, "pni": pni,
                "noise": "weight", "dataset": "digits", "seed": args.seed}
        slug = name.split(" (")[0].replace(" ", "").replace("+", "_").replace("-", "").lower()
        t0 = time.perf_counter()
        print(f"[demo] training {name}: {epochs} epochs{'' if not cfg.adversarial else f', PGD-{cfg.adv_steps} from epoch {warmup + 1}'}",
              file=sys.stderr, flush=True)
        hist = train(model, train_set, test_set, cfg, out_dir=os.path.join(args.out, slug), device="cpu",
                     progress=not args.no_progress, model_spec=spec, overwrite=True)
        t_train = time.perf_counter() - t0
        print(f"[demo] evaluating {name}", file=sys.stderr, flush=True)
        # a model without noise answers identically every time: one evaluation is exact (std 0)
        table[name] = evaluate(model, test_set, specs, repeats=repeats if pni is not None else 1,
                               batch_size=512, device="cpu")
        times[name] = time.perf_counter() - t0
        histories[name] = hist
        print(f"[demo] {name}: train {t_train:.1f} s, train+eval {times[name]:.1f} s", file=sys.stderr, flush=True)

    text = format_results(table)
    wall = time.perf_counter() - t_start
    header = (
        f"pni_fast demo: small CNN on scikit-learn digits ({len(train_set)} train / {len(test_set)} test, 8x8 in [0,1]), "
        f"{epochs} epochs, {warmup} clean warm-up epochs; adversarial training PGD-{base_cfg['adv_steps']} "
        f"eps={eps:g} step={eps / 4:g}, loss 0.5 clean + 0.5 adv"
    )
    print(header)
    print(text)
    print(f"wall time {wall:.1f} s on {torch.get_num_threads()} torch threads")
    results = {
        "header": header,
        "wall_time_s": wall,
        "threads": torch.get_num_threads(),
        "models": {k: [r.as_dict() for r in v] for k, v in table.items()},
        "history": histories,
        "seconds": times,
        "table": text,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write(header + "\n" + text + "\n")
    if not args.no_plot:
        path = _plot_demo(table, histories, os.path.join(args.out, "pni_demo.png"))
        print(f"saved {path}")
    return results


def _layer_label(name: str) -> str:
    """'features.0.alpha_w' -> 'features.0 (weight noise)': readable legend entries."""
    for suffix, kind in ((".alpha_w", "weight noise"), (".alpha_i", "input noise"), (".alpha", "noise")):
        if name.endswith(suffix):
            return f"{name[: -len(suffix)] or 'model'} ({kind})"
    return name


def _plot_demo(table: Dict[str, list], histories: Dict[str, list], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    cols = [r.attack for r in table[names[0]]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        means = [100 * r.mean for r in table[n]]
        stds = [100 * r.std for r in table[n]]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cols))]
        ax1.bar(xs, means, width, yerr=stds, capsize=3, label=n)
    ax1.set_xticks(range(len(cols)))
    ax1.set_xticklabels(cols)
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title("accuracy, mean +/- std over noisy evaluations")
    ax1.legend(fontsize=8)
    plotted = []
    for n, hist in histories.items():
        layers = sorted({k for h in hist for k in h.get("alpha", {})})
        for layer in layers:
            ep = [h["epoch"] for h in hist if layer in h["alpha"]]
            val = [abs(h["alpha"][layer]) for h in hist if layer in h["alpha"]]
            ax2.plot(ep, val, marker=".", label=_layer_label(layer))
            plotted.append(n)
    if plotted:
        ax2.legend(fontsize=7, title="layer")
        from matplotlib.ticker import MaxNLocator

        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    else:
        ax2.text(0.5, 0.5, "no PNI layers", ha="center", transform=ax2.transAxes)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("|alpha| (mean per layer; the noise scale)")
    model_name = ", ".join(dict.fromkeys(plotted)) if plotted else "PNI model"
    ax2.set_title(f"{model_name}: learned noise scale |alpha|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load_data(dataset: str, data_dir: Optional[str], seed: int = 0):
    from .data import load_cifar10, load_digits

    if dataset == "cifar10":
        if not data_dir:
            raise ValueError("CIFAR-10 needs --data-dir: the folder with data_batch_1..5 and test_batch")
        return load_cifar10(data_dir)
    return load_digits(seed=seed)


def run_train(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """``train``; under torchrun one process per rank (DDP: gloo on CPU, nccl on CUDA), rank 0 prints and writes."""
    from . import distributed

    device = distributed.init_from_env(args.device)
    try:
        return _run_train(args, device, distributed.context().is_main)
    finally:
        distributed.teardown()


def _run_train(args: argparse.Namespace, device: torch.device, main_rank: bool) -> List[Dict[str, Any]]:
    from .train import TrainConfig, load_checkpoint, train

    say = (lambda *a, **k: print(*a, **k)) if main_rank else (lambda *a, **k: None)
    dataset = args.dataset or ("cifar10" if (args.data_dir or args.model in RESNETS) else "digits")
    if args.model in RESNETS and dataset != "cifar10":
        raise ValueError(f"--model {args.model} is a CIFAR ResNet (3x32x32 inputs); use --dataset cifar10 --data-dir DIR")
    if args.model == "digits_cnn" and dataset == "cifar10":
        in_channels = 3
    else:
        in_channels = 1
    if args.warmup_epochs >= args.epochs and not args.no_adv:
        say(f"note: --warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: no adversarial epoch will run",
            file=sys.stderr)
    train_set, test_set = _load_data(dataset, args.data_dir, args.seed)
    if args.limit_train:
        train_set = train_set.subset(args.limit_train)
    augment = dataset == "cifar10" if args.augment == "auto" else args.augment == "yes"
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        nesterov=args.momentum > 0, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        adversarial=not args.no_adv, adv_eps=args.eps, adv_alpha=args.step, adv_steps=args.pgd_steps,
        adv_targets=args.targets, augment=augment, seed=args.seed, eval_samples=args.eval_samples,
    )
    spec = {"arch": args.model, "pni": None if args.pni == "none" else args.pni, "noise": args.noise,
            "num_classes": 10, "in_channels": in_channels, "width": 32, "dataset": dataset}
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        old = ckpt.get("model_spec") or {}
        if old and (old.get("arch"), old.get("pni")) != (spec["arch"], spec["pni"]):
            raise ValueError(f"--resume checkpoint holds {old.get('arch')} pni={old.get('pni')}, "
                             f"but --model {spec['arch']} --pni {args.pni} was asked")
        if int(ckpt["epoch"]) >= args.epochs:
            say(f"nothing to train: checkpoint {args.resume} already holds {int(ckpt['epoch'])} epochs "
                f"(--epochs {args.epochs}); pass a larger --epochs to continue it", file=sys.stderr)
            return list(ckpt.get("history", []))
        say(f"resuming {args.resume} after epoch {int(ckpt['epoch'])} of {args.epochs}")
        del ckpt
    torch.manual_seed(args.seed)
    model = build_model(spec)
    try:
        hist = train(model, train_set, test_set, cfg, out_dir=args.out, resume=args.resume, device=device,
                     progress=not args.no_progress, model_spec=spec, overwrite=args.overwrite,
                     rank_noise=args.rank_noise)
    except KeyboardInterrupt:
        if main_rank:
            print(_interrupted_message(args), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if hist:
        last = hist[-1]
        adv = last["test_adv_acc"]
        say(f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}, test clean acc "
            f"{100 * last['test_clean_acc']:.2f}%" + (f", test PGD-{cfg.eval_pgd_steps} acc {100 * adv:.2f}%" if adv is not None else ""))
    say(f"checkpoint and logs in {args.out}")
    return hist


def _interrupted_message(args: argparse.Namespace) -> str:
    """One line after Ctrl-C: the last checkpoint and the exact command that resumes it."""
    from .train import CHECKPOINT_NAME, load_checkpoint

    ckpt = os.path.join(args.out, CHECKPOINT_NAME)
    if not os.path.isfile(ckpt) and args.resume:
        ckpt = args.resume  # interrupted before this run wrote its own checkpoint
    epoch = None
    if os.path.exists(ckpt):
        try:
            epoch = int(load_checkpoint(ckpt)["epoch"])
        except (ValueError, OSError):
            epoch = None
    argv, skip = [], False
    for a in getattr(args, "argv", None) or []:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume=") and a != "--overwrite":
            argv.append(a)
    python = "python" if shutil.which("python") and os.path.realpath(shutil.which("python")) == os.path.realpath(
        sys.executable) else sys.executable
    if epoch is None:
        cmd = shlex.join([python, "-m", "pni_fast", *argv])
        return f"interrupted before a checkpoint was written (nothing to resume); start again with: {cmd}"
    cmd = shlex.join([python, "-m", "pni_fast", *argv, "--resume", ckpt])
    return f"interrupted: last checkpoint {ckpt} (epoch {epoch} of {args.epochs}); resume with: {cmd}"


def run_eval(args: argparse.Namespace) -> list:
    from .evaluate import evaluate, format_results
    from .train import TrainConfig, load_checkpoint, resolve_device

    ckpt = load_checkpoint(args.checkpoint)
    spec = ckpt.get("model_spec")
    if not spec:
        raise ValueError(f"{args.checkpoint}: checkpoint has no model_spec; it was not written by 'python -m pni_fast train/demo'")
    cfg = TrainConfig.from_dict(ckpt.get("config", {}))
    model = build_model(spec)
    model.load_state_dict(ckpt["model"])
    dev = resolve_device(args.device)
    model.to(dev).eval()
    _, test_set = _load_data(spec.get("dataset", "digits"), args.data_dir, int(spec.get("seed", 0)))
    if args.limit:
        test_set = test_set.subset(args.limit)
    eps = cfg.adv_eps if args.eps is None else args.eps
    step = eps / 4 if args.step is None else args.step
    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    specs = _eval_specs(names, eps, step, args.pgd_steps, args.restarts, args.eot_samples, args.targets,
                        cw={"cw_c": args.cw_c, "cw_kappa": args.cw_kappa, "cw_steps": args.cw_steps},
                        aa={"steps": args.aa_steps, "eot_samples": max(2, args.aa_eot_samples)},
                        square={"n_queries": args.square_queries, "p_init": args.square_p_init})
    if args.no_noise:
        from .control import set_noise
        from .modules import is_noisy_module

        if any(is_noisy_module(m) for m in model.modules()):
            set_noise(model, False)
    res = evaluate(model, test_set, specs, repeats=args.repeats, batch_size=args.batch_size, device=dev)
    label = f"{spec['arch']}" + (f" + PNI ({spec['pni']}, {spec.get('noise', 'weight')})" if spec.get("pni") else "")
    print(format_results({label: res}, args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": label, "checkpoint": os.fspath(args.checkpoint), "results": [r.as_dict() for r in res]}, f, indent=1)
    return res


def run_info(args: argparse.Namespace) -> None:
    from . import backends

    print(backends.info())


def _bench_script() -> str:
    """benchmarks/run_all.py of the source checkout this package runs from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "benchmarks", "run_all.py")


def run_bench(args: argparse.Namespace) -> int:
    import runpy

    script = _bench_script()
    if not os.path.isfile(script):
        print(
            f"pni_fast bench: {script} not found. The benchmarks ship with the source repository, not the "
            "installed package: run 'python -m pni_fast bench' from a checkout (or 'python benchmarks/run_all.py').",
            file=sys.stderr,
        )
        return 1
    argv = list(args.bench_args or [])
    if argv and argv[0] == "--":
        argv = argv[1:]
    old = sys.argv
    sys.argv = [script] + argv
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if args.command == "bench":
        args.bench_args = extra + list(args.bench_args or [])  # options for run_all.py pass through
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    flush = args.command in ("demo", "train", "eval")
    if flush:
        # tiny gradients late in training become subnormal floats, which slow CPU math ~10x
        # (measured: 20 plain digits epochs 13.5 s -> 1.4 s, same accuracy); switched off again on
        # return so a caller in the same process (tests, notebooks) keeps IEEE subnormals
        torch.set_flush_denormal(True)
    try:
        if args.command == "demo":
            run_demo(args)
        elif args.command == "train":
            run_train(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "info":
            run_info(args)
        elif args.command == "bench":
            return run_bench(args)
    except (ValueError, OSError, TypeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message
        parser.exit(2, f"{parser.prog} {args.command}: error: {msg}\n")
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return 0
