"""``python -m pni_fast demo``: the one-command tour of the toolkit.

On scikit-learn's bundled digits it trains a small CNN three ways (plain; PGD adversarial training;
PGD training + PNI-W via `pni_fast.convert`), evaluates clean / PGD / EOT-PGD accuracy, and
AutoAttack-rand / Square / EOT-Square accuracy when torchattacks is installed (small settings:
``--aa-steps``, ``--square-queries``, ``--square-eot-samples``), as mean +/- std over R noisy
evaluations and as worst-of-k accuracy (``--worst-of``); prints the table with the definitions and
every attack setting under it and saves a PNG (accuracy bars, alpha over epochs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from ..models.digits_cnn import DigitsCNN
from ..nn.layers import PNI_MODES
from ._deps import require
from .checks import cli_fraction, cli_int
from .cli_eval import eval_specs
from .evaluate import WORST_OF
from .progress import attack_lines, epoch_lines

__all__ = ["add_parser", "run_demo"]


def add_parser(sub: Any, fmt: type) -> None:
    """The ``demo`` subcommand's options."""
    d = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help=(
            "train plain / PGD / PGD+PNI-W CNNs on the bundled digits and compare robustness (27 s on 2 idle "
            "cores without the AutoAttack-rand, Square and EOT-Square columns; about 4 min with them)"
        ),
        description="Train a small CNN on scikit-learn's bundled 8x8 digits three ways (plain, PGD adversarial "
        "training, PGD training + PNI-W via pni_fast.convert), then print clean / PGD / EOT-PGD accuracy, and "
        "AutoAttack-rand / Square / EOT-Square accuracy when torchattacks is installed (mean +/- std over R noisy "
        "evaluations, and worst-of-k: correct on all k noisy passes), and save a PNG to --out. Needs no download.",
    )
    d.add_argument(
        "--out",
        default="pni_demo_out",
        help="output folder for results.json, the PNG and the logs (a re-run replaces its contents)",
    )
    d.add_argument("--epochs", type=cli_int(1, "a positive integer"), default=20, help="training epochs per model")
    d.add_argument(
        "--warmup-epochs", type=cli_int(0, "an integer >= 0"), default=2, help="clean epochs before PGD training starts"
    )
    d.add_argument(
        "--eps", type=cli_fraction, default=0.2, help="L-inf radius for training and evaluation (images in [0,1])"
    )
    d.add_argument(
        "--pgd-steps",
        type=cli_int(1, "a positive integer"),
        default=10,
        help="PGD steps of the evaluation attacks (training uses 7)",
    )
    d.add_argument(
        "--eot-samples",
        type=cli_int(1, "a positive integer"),
        default=8,
        help="EOT-PGD: forward passes averaged per gradient step",
    )
    d.add_argument(
        "--aa-steps",
        type=cli_int(1, "a positive integer"),
        default=10,
        help="AutoAttack-rand: steps per APGD run (AutoAttack uses 100; small keeps the demo fast)",
    )
    d.add_argument(
        "--aa-eot-samples",
        type=cli_int(2, "an integer >= 2"),
        default=4,
        help="AutoAttack-rand: forward passes averaged per gradient (AutoAttack uses 20)",
    )
    d.add_argument(
        "--square-queries",
        type=cli_int(1, "a positive integer"),
        default=200,
        help="Square: queries per example (AutoAttack uses 5000)",
    )
    d.add_argument(
        "--square-eot-samples",
        type=cli_int(2, "an integer >= 2"),
        default=4,
        help="EOT-Square: noisy passes m averaged per margin (same queries as Square, m forward passes each)",
    )
    d.add_argument(
        "--worst-of",
        type=cli_int(1, "a positive integer"),
        default=WORST_OF,
        help="k of the worst-of-k columns: noisy passes that must all classify an attacked example correctly",
    )
    d.add_argument(
        "--no-torchattacks",
        action="store_true",
        help="skip the AutoAttack-rand, Square and EOT-Square columns (they need torchattacks)",
    )
    d.add_argument(
        "--repeats",
        type=cli_int(1, "a positive integer"),
        default=5,
        help="R: noisy evaluations behind each mean +/- std",
    )
    d.add_argument("--pni", choices=PNI_MODES, default="layerwise", help="alpha granularity of the PNI model")
    d.add_argument(
        "--width", type=cli_int(1, "a positive integer"), default=32, help="CNN width (channels of the first conv)"
    )
    d.add_argument(
        "--seed", type=cli_int(0, "an integer >= 0"), default=0, help="random seed (data order, init, noise)"
    )
    d.add_argument(
        "--threads",
        type=cli_int(1, "a positive integer"),
        default=1,
        help="torch CPU threads (the demo's layers are small: one thread is as fast on 2 cores and the README's "
        "table and timing are for it)",
    )
    d.add_argument(
        "--quick", action="store_true", help="tiny run in seconds (for tests): 2 epochs, 256 images, 2-step attacks"
    )
    d.add_argument("--no-plot", action="store_true", help="skip the PNG")
    d.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Train the three digits models, evaluate them, print the table, save results + plot."""
    from ..nn.convert import convert
    from .config import TrainConfig
    from .data import load_digits
    from .evaluate import evaluate, format_results
    from .train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train_set, test_set = load_digits(seed=args.seed)
    epochs, warmup, steps, eot, repeats, width = (
        args.epochs,
        args.warmup_epochs,
        args.pgd_steps,
        args.eot_samples,
        args.repeats,
        args.width,
    )
    aa = {"steps": args.aa_steps, "eot_samples": max(2, args.aa_eot_samples)}
    square = {"n_queries": args.square_queries}
    eot_square = {"eot_samples": args.square_eot_samples}
    worst_of = args.worst_of
    if args.quick:
        train_set, test_set = train_set.subset(256), test_set.subset(64)
        epochs, warmup, steps, eot, repeats, width = 2, 1, 2, 2, 2, 8
        aa, square, eot_square = {"steps": 2, "eot_samples": 2}, {"n_queries": 10}, {"eot_samples": 2}
        worst_of = min(worst_of, 4)
    if warmup >= epochs:
        raise ValueError(f"--warmup-epochs ({warmup}) must be smaller than --epochs ({epochs})")
    os.makedirs(args.out, exist_ok=True)
    eps = args.eps
    base_cfg = dict(
        epochs=epochs,
        batch_size=128,
        warmup_epochs=warmup,
        adv_eps=eps,
        adv_alpha=eps / 4,
        adv_steps=7 if not args.quick else 2,
        seed=args.seed,
        eval_samples=len(test_set),
        eval_pgd_steps=min(steps, 5),
    )
    runs = [
        ("plain", TrainConfig(adversarial=False, **base_cfg), None),
        ("PGD-AT", TrainConfig(adversarial=True, **base_cfg), None),
        (f"PGD-AT + PNI-W ({args.pni})", TrainConfig(adversarial=True, **base_cfg), args.pni),
    ]
    attacks = ["clean", "pgd", "eot-pgd"]
    if args.no_torchattacks:
        pass
    elif importlib.util.find_spec("torchattacks") is None:
        print(
            "[demo] torchattacks is not installed: no AutoAttack-rand, Square and EOT-Square columns "
            "(pip install --no-deps torchattacks; --no-torchattacks silences this note)",
            file=sys.stderr,
        )
    else:
        attacks += ["autoattack-rand", "square", "eot-square"]
    specs = eval_specs(attacks, eps, eps / 4, steps, 1, eot, "labels", aa=aa, square=square, eot_square=eot_square)
    table: dict[str, list] = {}
    histories: dict[str, list] = {}
    times: dict[str, float] = {}
    for name, cfg, pni in runs:
        torch.manual_seed(args.seed)
        model: nn.Module = DigitsCNN(1, 10, width)
        if pni is not None:
            model = convert(model, pni=pni, noise="weight")
        spec = {
            "arch": "digits_cnn",
            "width": width,
            "in_channels": 1,
            "num_classes": 10,
            "pni": pni,
            "noise": "weight",
            "dataset": "digits",
            "seed": args.seed,
        }
        slug = name.split(" (")[0].replace(" ", "").replace("+", "_").replace("-", "").lower()
        t0 = time.perf_counter()
        print(
            f"[demo] training {name}: {epochs} epochs"
            f"{'' if not cfg.adversarial else f', PGD-{cfg.adv_steps} from epoch {warmup + 1}'}",
            file=sys.stderr,
            flush=True,
        )
        hist = train(
            model,
            train_set,
            test_set,
            cfg,
            out_dir=os.path.join(args.out, slug),
            device="cpu",
            progress=not args.no_progress,
            model_spec=spec,
            overwrite=True,
            on_epoch=epoch_lines(f"demo {name}", cfg.epochs),
        )
        t_train = time.perf_counter() - t0
        print(f"[demo] evaluating {name}", file=sys.stderr, flush=True)
        # a model without noise answers identically every time: one evaluation is exact (std 0)
        table[name] = evaluate(
            model,
            test_set,
            specs,
            repeats=repeats if pni is not None else 1,
            batch_size=512,
            device="cpu",
            worst_of=worst_of,
            on_attack=attack_lines(f"demo {name}"),
        )
        times[name] = time.perf_counter() - t0
        histories[name] = hist
        print(f"[demo] {name}: train {t_train:.1f} s, train+eval {times[name]:.1f} s", file=sys.stderr, flush=True)

    text = format_results(table)
    wall = time.perf_counter() - t_start
    header = (
        f"pni_fast demo: small CNN on scikit-learn digits ({len(train_set)} train / {len(test_set)} test, "
        "8x8 in [0,1]), "
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


def _plot_demo(table: dict[str, list], histories: dict[str, list], path: str) -> str:
    matplotlib = require("matplotlib", "the demo's plot (pass --no-plot to skip it)")
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
        worst = [100 * r.worst for r in table[n]]
        if any(r.worst_of > 1 for r in table[n]) and any(w != m for w, m in zip(worst, means)):
            ax1.scatter(xs, worst, marker="_", s=120, color="black", zorder=3)
    ks = sorted({r.worst_of for v in table.values() for r in v})
    if ks != [1]:
        ax1.scatter([], [], marker="_", s=120, color="black", label=f"worst-of-{ks[-1]} (all {ks[-1]} passes right)")
    ax1.set_xticks(range(len(cols)))
    ax1.set_xticklabels(cols, rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title("accuracy, mean +/- std over noisy evaluations; black: worst-of-k")
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
