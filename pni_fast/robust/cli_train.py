"""``python -m pni_fast train``: the PNI paper's recipe from the command line, one process or under torchrun."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from typing import Any, Optional

import torch

from ..models.spec import ARCHS as MODELS
from ..models.spec import RESNETS, build_model
from ..nn.layers import NOISE_TYPES, PNI_MODES
from .checks import cli_fraction, cli_int, cli_positive_fraction
from .progress import epoch_lines

__all__ = ["add_parser", "run_train", "load_data", "PNI_CHOICES"]

PNI_CHOICES = ("none", *PNI_MODES)  # a plain model, or one of the PNI modes


def add_parser(sub: Any, fmt: type) -> None:
    """The ``train`` subcommand's options."""
    t = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="PGD adversarial training of a plain or PNI model (digits or CIFAR-10)",
        description="Train with the PNI paper's recipe (SGD Nesterov 0.9, lr 0.1 x0.1 at 50%/75%, batch 128, "
        "weight decay 3e-4 except alphas, clean warm-up, then PGD-7 eps 8/255 step 2/255, loss 0.5 clean + "
        "0.5 adversarial). Writes checkpoint.pt, history.json and metrics.csv to --out after every epoch.",
    )
    t.add_argument("--model", choices=MODELS, default="digits_cnn", help="architecture")
    t.add_argument(
        "--dataset",
        choices=("digits", "cifar10"),
        default=None,
        help="data set (default: cifar10 when --data-dir is given or the model is a ResNet, else digits)",
    )
    t.add_argument("--data-dir", default=None, help="folder with CIFAR-10 python batches (data_batch_1..5, test_batch)")
    t.add_argument("--pni", choices=PNI_CHOICES, default="none", help="PNI alpha granularity; none = plain model")
    t.add_argument("--noise", choices=NOISE_TYPES, default="weight", help="PNI on weights, layer inputs, or both")
    t.add_argument("--epochs", type=cli_int(1, "a positive integer"), default=160, help="training epochs")
    t.add_argument(
        "--batch-size", type=cli_int(1, "a positive integer"), default=128, help="global batch (all processes together)"
    )
    t.add_argument(
        "--lr", type=cli_positive_fraction, default=0.1, help="initial learning rate (x0.1 at 50%% and 75%%)"
    )
    t.add_argument("--momentum", type=cli_fraction, default=0.9, help="SGD Nesterov momentum")
    t.add_argument("--weight-decay", type=cli_fraction, default=3e-4, help="weight decay (never applied to alphas)")
    t.add_argument(
        "--warmup-epochs",
        type=cli_int(0, "an integer >= 0"),
        default=5,
        help="clean epochs before adversarial training",
    )
    t.add_argument("--no-adv", action="store_true", help="plain training (no PGD)")
    t.add_argument("--eps", type=cli_fraction, default=8 / 255, help="PGD L-inf radius (accepts 8/255)")
    t.add_argument("--step", type=cli_positive_fraction, default=2 / 255, help="PGD step size")
    t.add_argument("--pgd-steps", type=cli_int(1, "a positive integer"), default=7, help="PGD steps for training")
    t.add_argument("--targets", choices=("labels", "predictions"), default="labels", help="PGD targets")
    t.add_argument("--augment", choices=("auto", "yes", "no"), default="auto", help="crop+flip (auto: CIFAR only)")
    t.add_argument(
        "--eval-samples", type=cli_int(0, "an integer >= 0"), default=1000, help="test images checked after each epoch"
    )
    t.add_argument(
        "--seed", type=cli_int(0, "an integer >= 0"), default=0, help="random seed (data order, init, noise)"
    )
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument(
        "--out",
        default="pni_run",
        help="output folder; one that holds another run is refused unless --resume or --overwrite",
    )
    t.add_argument(
        "--resume",
        default=None,
        help="checkpoint file or folder to continue from (same noise stream); if it already holds "
        "--epochs epochs, a note says so and the command exits 0 without training",
    )
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument(
        "--limit-train",
        type=cli_int(1, "a positive integer"),
        default=None,
        help="use only the first N training images",
    )
    t.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    t.add_argument(
        "--rank-noise",
        choices=("same", "independent"),
        default=None,
        help="multi-process runs (torchrun --nproc_per_node N -m pni_fast train ...): 'same' (the default "
        "under torchrun) = every rank draws the same PNI noise per step, so the step is one noisy model's "
        "step over the global batch (one process's without BatchNorm and PGD random starts: see README); "
        "'independent' = per-rank noise streams, N noise samples per step for the alpha gradient, results "
        "depend on N. --batch-size is the global "
        "batch. Given in a single process, that process uses the per-epoch noise streams of a "
        "multi-process run (a reference run); not given, it keeps its usual stream",
    )


def load_data(dataset: str, data_dir: Optional[str], seed: int = 0):
    from .data import load_cifar10, load_digits

    if dataset == "cifar10":
        if not data_dir:
            raise ValueError("CIFAR-10 needs --data-dir: the folder with data_batch_1..5 and test_batch")
        return load_cifar10(data_dir)
    return load_digits(seed=seed)


def run_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``train``; under torchrun one process per rank (DDP: gloo on CPU, nccl on CUDA), rank 0 prints and writes."""
    from . import distributed

    device = distributed.init_from_env(args.device)
    try:
        history = _run_train(args, device, distributed.context().is_main)
        distributed.finish()  # only on success: after an error a barrier could wait for a rank that is gone
        return history
    finally:
        distributed.teardown()


def _run_train(args: argparse.Namespace, device: torch.device, main_rank: bool) -> list[dict[str, Any]]:
    from .config import TrainConfig
    from .train import load_checkpoint, train

    say = (lambda *a, **k: print(*a, **k)) if main_rank else (lambda *a, **k: None)
    dataset = args.dataset or ("cifar10" if (args.data_dir or args.model in RESNETS) else "digits")
    if args.model in RESNETS and dataset != "cifar10":
        raise ValueError(
            f"--model {args.model} is a CIFAR ResNet (3x32x32 inputs); use --dataset cifar10 --data-dir DIR"
        )
    if args.model == "digits_cnn" and dataset == "cifar10":
        in_channels = 3
    else:
        in_channels = 1
    if args.warmup_epochs >= args.epochs and not args.no_adv:
        say(
            f"note: --warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: no adversarial epoch will run",
            file=sys.stderr,
        )
    train_set, test_set = load_data(dataset, args.data_dir, args.seed)
    if args.limit_train:
        train_set = train_set.subset(args.limit_train)
    augment = dataset == "cifar10" if args.augment == "auto" else args.augment == "yes"
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.momentum > 0,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        adversarial=not args.no_adv,
        adv_eps=args.eps,
        adv_alpha=args.step,
        adv_steps=args.pgd_steps,
        adv_targets=args.targets,
        augment=augment,
        seed=args.seed,
        eval_samples=args.eval_samples,
    )
    spec = {
        "arch": args.model,
        "pni": None if args.pni == "none" else args.pni,
        "noise": args.noise,
        "num_classes": 10,
        "in_channels": in_channels,
        "width": 32,
        "dataset": dataset,
    }
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        old = ckpt.get("model_spec") or {}
        # the noise kind only matters with PNI: "both" adds alpha_i parameters the state_dict must hold
        held = (old.get("arch"), old.get("pni"), old.get("noise", "weight") if old.get("pni") else None)
        if old and held != (spec["arch"], spec["pni"], spec["noise"] if spec["pni"] else None):
            raise ValueError(
                f"--resume checkpoint holds {held[0]} pni={held[1]}{f' noise={held[2]}' if held[2] else ''}, "
                f"but --model {spec['arch']} --pni {args.pni}{f' --noise {args.noise}' if spec['pni'] else ''} "
                "was asked"
            )
        if int(ckpt["epoch"]) >= args.epochs:
            say(
                f"nothing to train: checkpoint {args.resume} already holds {int(ckpt['epoch'])} epochs "
                f"(--epochs {args.epochs}); pass a larger --epochs to continue it",
                file=sys.stderr,
            )
            return list(ckpt.get("history", []))
        say(f"resuming {args.resume} after epoch {int(ckpt['epoch'])} of {args.epochs}")
        del ckpt
    torch.manual_seed(args.seed)
    model = build_model(spec)
    try:
        hist = train(
            model,
            train_set,
            test_set,
            cfg,
            out_dir=args.out,
            resume=args.resume,
            device=device,
            progress=not args.no_progress,
            model_spec=spec,
            overwrite=args.overwrite,
            rank_noise=args.rank_noise,
            on_epoch=epoch_lines("train", cfg.epochs) if main_rank else None,
        )
    except KeyboardInterrupt:
        if main_rank:
            print(_interrupted_message(args), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if hist:
        last = hist[-1]
        adv = last["test_adv_acc"]
        say(
            f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}, test clean acc "
            f"{100 * last['test_clean_acc']:.2f}%"
            + (f", test PGD-{cfg.eval_pgd_steps} acc {100 * adv:.2f}%" if adv is not None else "")
        )
    say(f"checkpoint and logs in {args.out}")
    return hist


def _interrupted_message(args: argparse.Namespace) -> str:
    """One line after Ctrl-C: the last checkpoint and the exact command that resumes it."""
    from .checkpoint import CHECKPOINT_NAME, load_checkpoint

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
    python = (
        "python"
        if shutil.which("python") and os.path.realpath(shutil.which("python")) == os.path.realpath(sys.executable)
        else sys.executable
    )
    if epoch is None:
        cmd = shlex.join([python, "-m", "pni_fast", *argv])
        return f"interrupted before a checkpoint was written (nothing to resume); start again with: {cmd}"
    cmd = shlex.join([python, "-m", "pni_fast", *argv, "--resume", ckpt])
    return f"interrupted: last checkpoint {ckpt} (epoch {epoch} of {args.epochs}); resume with: {cmd}"
