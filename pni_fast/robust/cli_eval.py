"""``python -m pni_fast eval``: attack a checkpoint written by ``train`` or ``demo``; the attack list both share."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

from ..models.spec import build_model
from .checks import cli_fraction, cli_int, cli_positive_fraction
from .evaluate import WORST_OF, AttackSpec
from .progress import attack_lines

__all__ = ["add_parser", "run_eval", "eval_specs"]


def add_parser(sub: Any, fmt: type) -> None:
    """The ``eval`` subcommand's options."""
    e = sub.add_parser(
        "eval",
        formatter_class=fmt,
        help="attack a checkpoint: clean / FGSM / PGD / EOT-PGD / CW / AA-rand / (EOT-)Square accuracy, mean +/- std "
        "and worst-of-k",
        description="Evaluate a checkpoint written by 'train' or 'demo' under attacks; reports mean +/- std over "
        "R noisy evaluations and the worst-of-k accuracy (an attacked example counts as correct only if k noisy "
        "passes all classify it correctly) with every setting. --mc-curve adds the accuracy of the Monte-Carlo "
        "prediction (mean softmax over k noisy passes) for each k.",
    )
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its folder)")
    e.add_argument("--data-dir", default=None, help="CIFAR-10 folder (needed for CIFAR checkpoints)")
    e.add_argument(
        "--attacks",
        default="clean,pgd,eot-pgd",
        help="comma-separated from: clean, fgsm, pgd, eot-pgd, cw, autoattack-rand, square, eot-square (the last "
        "three need: pip install --no-deps torchattacks)",
    )
    e.add_argument("--eps", type=cli_fraction, default=None, help="L-inf radius (default: the training eps)")
    e.add_argument("--step", type=cli_positive_fraction, default=None, help="PGD step (default: eps/4)")
    e.add_argument("--pgd-steps", type=cli_int(1, "a positive integer"), default=20)
    e.add_argument("--restarts", type=cli_int(1, "a positive integer"), default=1)
    e.add_argument("--eot-samples", type=cli_int(1, "a positive integer"), default=8)
    e.add_argument("--targets", choices=("labels", "predictions"), default="labels")
    e.add_argument("--cw-c", type=cli_positive_fraction, default=1.0, help="CW: initial constant c (binary-searched)")
    e.add_argument("--cw-kappa", type=cli_fraction, default=0.0, help="CW: confidence margin kappa")
    e.add_argument(
        "--cw-steps", type=cli_int(1, "a positive integer"), default=100, help="CW: Adam steps per binary-search step"
    )
    e.add_argument(
        "--aa-steps", type=cli_int(1, "a positive integer"), default=100, help="AutoAttack-rand: steps per APGD run"
    )
    e.add_argument(
        "--aa-eot-samples",
        type=cli_int(1, "a positive integer"),
        default=20,
        help="AutoAttack-rand: forward passes averaged per gradient (>= 2)",
    )
    e.add_argument(
        "--square-queries",
        type=cli_int(1, "a positive integer"),
        default=5000,
        help="Square: queries per example and restart",
    )
    e.add_argument("--square-p-init", type=cli_fraction, default=0.8, help="Square: initial fraction of pixels changed")
    e.add_argument(
        "--square-eot-samples",
        type=cli_int(2, "an integer >= 2"),
        default=4,
        help="EOT-Square: noisy passes m behind each margin (acceptance test, stopping rule, verdicts)",
    )
    e.add_argument(
        "--worst-of",
        type=cli_int(1, "a positive integer"),
        default=WORST_OF,
        help="k for the worst-of-k accuracy: noisy passes that must all classify an attacked example correctly",
    )
    e.add_argument(
        "--mc-curve",
        default=None,
        metavar="K1,K2,...",
        help="also print the accuracy of the Monte-Carlo prediction (mean softmax over k noisy passes) for each k, "
        "on the adversarial examples of every attack in --attacks (R repeats), e.g. 1,2,4,8,16,32",
    )
    e.add_argument("--repeats", type=cli_int(1, "a positive integer"), default=5, help="R noisy evaluations")
    e.add_argument(
        "--limit", type=cli_int(1, "a positive integer"), default=None, help="evaluate only the first N test images"
    )
    e.add_argument("--batch-size", type=cli_int(1, "a positive integer"), default=256)
    e.add_argument("--no-noise", action="store_true", help="switch PNI noise off (deterministic model)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")


def eval_specs(
    names: Sequence[str],
    eps: float,
    step: float,
    steps: int,
    restarts: int,
    eot: int,
    targets: str,
    cw: Optional[dict[str, Any]] = None,
    aa: Optional[dict[str, Any]] = None,
    square: Optional[dict[str, Any]] = None,
    eot_square: Optional[dict[str, Any]] = None,
) -> list:
    specs = []
    for n in names:
        if n == "clean":
            specs.append(AttackSpec("clean"))
        elif n == "fgsm":
            specs.append(AttackSpec("fgsm", eps=eps, targets=targets))
        elif n == "pgd":
            specs.append(AttackSpec("pgd", eps=eps, alpha=step, steps=steps, restarts=restarts, targets=targets))
        elif n == "eot-pgd":
            specs.append(
                AttackSpec(
                    "eot-pgd",
                    eps=eps,
                    alpha=step,
                    steps=steps,
                    restarts=restarts,
                    eot_samples=max(2, eot),
                    targets=targets,
                )
            )
        elif n == "cw":
            specs.append(AttackSpec("cw", targets=targets, **(cw or {})))
        elif n == "autoattack-rand":
            aa_kw = {"steps": steps, "eot_samples": max(2, eot), **(aa or {})}
            specs.append(AttackSpec("autoattack-rand", eps=eps, restarts=restarts, targets=targets, **aa_kw))
        elif n == "square":
            specs.append(AttackSpec("square", eps=eps, restarts=restarts, targets=targets, **(square or {})))
        elif n == "eot-square":
            kw = {"eot_samples": max(2, eot), **(square or {}), **(eot_square or {})}
            specs.append(AttackSpec("eot-square", eps=eps, restarts=restarts, targets=targets, **kw))
        else:
            raise ValueError(
                f"--attacks: unknown attack {n!r}; choose from clean, fgsm, pgd, eot-pgd, cw, autoattack-rand, square, "
                "eot-square"
            )
    return specs


def _parse_ks(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] for --mc-curve (each k >= 1)."""
    ks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            k = int(part)
        except ValueError:
            raise ValueError(f"--mc-curve: expected comma-separated integers >= 1, got {part!r}") from None
        if k < 1:
            raise ValueError(f"--mc-curve: every k must be >= 1, got {k}")
        ks.append(k)
    if not ks:
        raise ValueError("--mc-curve: give at least one k, e.g. 1,2,4,8")
    return ks


def run_eval(args: argparse.Namespace) -> list:
    from .checkpoint import load_checkpoint
    from .cli_train import load_data
    from .config import TrainConfig, resolve_device
    from .evaluate import evaluate, format_results

    ckpt = load_checkpoint(args.checkpoint)
    spec = ckpt.get("model_spec")
    if not spec:
        raise ValueError(
            f"{args.checkpoint}: checkpoint has no model_spec; it was not written by 'python -m pni_fast train/demo'"
        )
    cfg = TrainConfig.from_dict(ckpt.get("config", {}))
    model = build_model(spec)
    model.load_state_dict(ckpt["model"])
    dev = resolve_device(args.device)
    model.to(dev).eval()
    _, test_set = load_data(spec.get("dataset", "digits"), args.data_dir, int(spec.get("seed", 0)))
    if args.limit:
        test_set = test_set.subset(args.limit)
    eps = cfg.adv_eps if args.eps is None else args.eps
    step = eps / 4 if args.step is None else args.step
    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    specs = eval_specs(
        names,
        eps,
        step,
        args.pgd_steps,
        args.restarts,
        args.eot_samples,
        args.targets,
        cw={"cw_c": args.cw_c, "cw_kappa": args.cw_kappa, "cw_steps": args.cw_steps},
        aa={"steps": args.aa_steps, "eot_samples": max(2, args.aa_eot_samples)},
        square={"n_queries": args.square_queries, "p_init": args.square_p_init},
        eot_square={"eot_samples": args.square_eot_samples},
    )
    ks = _parse_ks(args.mc_curve) if args.mc_curve else None
    if args.no_noise:
        from ..nn.control import set_noise
        from ..nn.layers import is_noisy_module

        if any(is_noisy_module(m) for m in model.modules()):
            set_noise(model, False)
    res = evaluate(
        model,
        test_set,
        specs,
        repeats=args.repeats,
        batch_size=args.batch_size,
        device=dev,
        worst_of=args.worst_of,
        on_attack=attack_lines("eval"),
    )
    label = f"{spec['arch']}" + (f" + PNI ({spec['pni']}, {spec.get('noise', 'weight')})" if spec.get("pni") else "")
    print(format_results({label: res}, args.repeats))
    curves = []
    if ks:
        from .montecarlo import accuracy_vs_samples

        for s in specs:
            curve = accuracy_vs_samples(
                model, test_set, ks, attack=s, repeats=args.repeats, batch_size=args.batch_size, device=dev
            )
            curves.append(curve)
            print()
            print(curve.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": label,
                    "checkpoint": os.fspath(args.checkpoint),
                    "results": [r.as_dict() for r in res],
                    "mc_curves": [
                        {"attack": c.attack, "ks": c.ks, "accuracies": {str(k): v for k, v in c.accuracies.items()}}
                        for c in curves
                    ],
                },
                f,
                indent=1,
            )
    return res
