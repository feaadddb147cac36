"""PGD adversarial training with PNI, the paper's recipe as the default.

Defaults follow the original PNI code (github.com/elliothe/CVPR_2019_PNI,
``code/train_cifar.sh`` and ``code/main.py``): SGD with Nesterov momentum 0.9,
lr 0.1 multiplied by 0.1 at epochs 80 and 120 of 160 (50% and 75%), batch 128,
weight decay 3e-4 (the script's ``--decay 0.0003``) on every parameter except
the PNI alphas (own optimizer group with weight_decay 0), 5 clean warm-up
epochs (``--epoch_delay 5``), then PGD-7 adversarial training with the loss
``0.5 * CE(clean) + 0.5 * CE(adversarial)``. The original's PGD uses
eps 0.031 and step 0.01; we use the usual 8/255 and 2/255.

The adversarial batch is generated on the model in eval mode with its noise on
(`attacks.pgd` attacks in eval mode by default, and restores the mode):
BatchNorm uses and does not update its running statistics, exactly as for an
eval-mode copy of the model, without the cost of copying it every batch.

Checkpoints hold model, optimizer, scheduler, completed epochs, history, RNG
states and config; they are written atomically (temp file + ``os.replace``)
after every epoch with a sha256 checksum (`pni_fast.checkpoint`), so a crash
loses at most the epoch in progress, a damaged file is reported instead of
loaded, and ``resume`` continues bit-for-bit (same shuffling, augmentation and
noise). ``history.json``/``metrics.csv`` are written after the checkpoint and
rewritten from the checkpoint's history on resume, so they never run ahead of
it. Leftover ``*.tmp<pid>`` files of an interrupted writer are removed when a
run starts, and a run refuses to write into a folder that holds another run
unless asked to (``overwrite=True``).

The training data is an in-memory `Split` or any iterable of ``(x, y)`` batches
(a ``DataLoader`` with your own data and augmentation). Inside a
``torch.distributed`` process group (``torchrun``) the model is trained with
``DistributedDataParallel``; see `train` and `pni_fast.distributed`.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as _dist
from .attacks import model_mode, pgd
from .checkpoint import (
    CHECKPOINT_NAME,
    RUN_FILES,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from .checkpoint import prepare_out_dir as _prepare_out_dir
from .checkpoint import rng_state as _rng_state
from .checkpoint import set_rng_state as _set_rng_state
from .checkpoint import write_logs as _write_logs
from .data import Split, check_batch_source, iterate_batches, iterate_user_batches
from .optim import param_groups
from .rng import manual_seed as _pni_manual_seed
from .rng import own_generator

__all__ = [
    "TrainConfig",
    "train",
    "make_optimizer",
    "make_scheduler",
    "save_checkpoint",
    "load_checkpoint",
    "alpha_means",
    "resolve_device",
    "CHECKPOINT_NAME",
    "CheckpointError",
    "RUN_FILES",
]



@dataclass
class TrainConfig:
    """Every knob of `train`; defaults = the PNI paper's CIFAR-10 recipe (see module docstring)."""

    epochs: int = 160
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-4
    lr_milestones: Tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs`
    lr_gamma: float = 0.1
    warmup_epochs: int = 5  # clean epochs before adversarial training starts
    adversarial: bool = True
    adv_eps: float = 8 / 255
    adv_alpha: float = 2 / 255
    adv_steps: int = 7
    adv_random_start: bool = True
    adv_targets: str = "labels"
    adv_noise: bool = True  # keep PNI noise on while generating the adversarial batch
    clean_weight: float = 0.5
    adv_weight: float = 0.5
    augment: bool = False  # random crop (pad 4) + horizontal flip
    seed: int = 0
    eval_samples: Optional[int] = 1000  # test images evaluated after each epoch (None = all)
    eval_pgd_steps: int = 7

    def __post_init__(self) -> None:
        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        def real(name: str, positive: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")

        pos_int("epochs")
        pos_int("batch_size")
        pos_int("warmup_epochs", 0)
        pos_int("adv_steps")
        pos_int("eval_pgd_steps")
        pos_int("seed", 0)
        for n in ("lr", "adv_alpha"):
            real(n, positive=True)
        for n in ("momentum", "weight_decay", "lr_gamma", "adv_eps", "clean_weight", "adv_weight"):
            real(n)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be fractions of the epochs in (0, 1), got {self.lr_milestones!r}")
        if self.adv_targets not in ("labels", "predictions"):
            raise ValueError(f"adv_targets must be 'labels' or 'predictions', got {self.adv_targets!r}")
        if self.eval_samples is not None:
            pos_int("eval_samples", 0)
        if self.clean_weight + self.adv_weight == 0:
            raise ValueError("clean_weight and adv_weight are both 0: the loss would be zero")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring unknown keys (checkpoints from other versions)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "lr_milestones" else v) for k, v in d.items() if k in names})


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'auto'/None -> cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the model's parameters, alphas in a weight-decay-free group."""
    return torch.optim.SGD(
        param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """Step decay at the configured fractions of the epochs (50%, 75% by default)."""
    milestones = sorted({max(1, int(round(f * config.epochs))) for f in config.lr_milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.lr_gamma)


def alpha_means(model: nn.Module) -> Dict[str, float]:
    """Mean value of every PNI alpha parameter, by parameter name (for logs and plots)."""
    return {
        n: float(p.detach().float().mean().item())
        for n, p in model.named_parameters()
        if "alpha" in n.rsplit(".", 1)[-1]
    }


@contextlib.contextmanager
def _noise_ctx(model: nn.Module, on: bool):
    """Noise as is (on) or switched off for the block (config.adv_noise=False)."""
    if on:
        yield model
        return
    from .control import no_noise
    from .modules import is_noisy_module

    if not any(is_noisy_module(m) for m in model.modules()):
        yield model  # a plain model has no noise to switch off
        return
    with no_noise(model):
        yield model


def _first(batches: Iterator[Tuple[torch.Tensor, torch.Tensor]], limit: Optional[int]):
    """The batches of ``batches`` up to ``limit`` examples in all (the last one cut), then stop reading."""
    left = limit
    for x, y in batches:
        if left is not None:
            if left <= 0:
                return
            x, y = x[:left], y[:left]
            left -= int(y.shape[0])
        yield x, y


def _evaluate_epoch(
    model: nn.Module, test: Any, config: TrainConfig, device: torch.device
) -> Tuple[float, Optional[float]]:
    """Clean and PGD accuracy (one noisy pass each) on the first eval_samples test images."""
    if isinstance(test, Split):
        batches = iterate_batches(test.subset(config.eval_samples), max(config.batch_size, 256), device=device)
    else:
        batches = _first(iterate_user_batches(test, "test_data", device), config.eval_samples)
    clean = adv = n = 0
    with model_mode(model, "eval"):
        for x, y in batches:
            n += int(y.shape[0])
            with torch.no_grad():
                clean += int((model(x).argmax(1) == y).sum())
            if config.adversarial:
                xa = pgd(model, x, y, eps=config.adv_eps, alpha=config.adv_alpha, steps=config.eval_pgd_steps,
                         random_start=True, targets=config.adv_targets)
                with torch.no_grad():
                    adv += int((model(xa).argmax(1) == y).sum())
    if n == 0:
        return float("nan"), None
    return clean / n, (adv / n if config.adversarial else None)


def _set_epoch(data: Any, epoch: int) -> None:
    """``set_epoch`` on a DataLoader's sampler / batch sampler (DistributedSampler reshuffles per epoch)."""
    seen = set()
    for s in (getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None),
              getattr(data, "batch_sampler", None)):
        if s is not None and id(s) not in seen and callable(getattr(s, "set_epoch", None)):
            seen.add(id(s))
            s.set_epoch(epoch)


def _num_batches(data: Any) -> Optional[int]:
    try:
        return len(data)
    except TypeError:
        return None


def train(
    model: nn.Module,
    train_data: Union[Split, Iterable],
    test_data: Union[Split, Iterable, None] = None,
    config: Optional[TrainConfig] = None,
    *,
    out_dir: Optional[Union[str, os.PathLike]] = None,
    resume: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    model_spec: Optional[Dict[str, Any]] = None,
    on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
    overwrite: bool = False,
    rank_noise: Optional[str] = None,
    distributed: Optional[bool] = None,
) -> List[Dict[str, Any]]:
    """Train ``model`` (plain or PNI) with clean warm-up then PGD adversarial training.

    Args:
        train_data: the training batches, either
            * a `Split` (in memory, float in [0,1] or uint8): shuffled per epoch with a generator seeded
              from ``(config.seed, epoch)``, cut into ``config.batch_size`` batches, crop+flip when
              ``config.augment``; or
            * any re-iterable of ``(x, y)`` batches: a ``torch.utils.data.DataLoader`` (your own data,
              transforms and augmentation), a list, ... It is iterated once per epoch; ``x`` is float
              images in [0, 1] (uint8 is scaled), ``y`` integer labels. ``config.batch_size`` and
              ``config.augment`` do not apply (augmentation belongs to the loader; ``augment=True`` is
              refused). A sampler with ``set_epoch`` (``DistributedSampler``) gets it every epoch.
              A one-shot iterator (generator) is accepted for a single epoch only.
        test_data: a `Split` or an iterable of ``(x, y)`` batches; gives per-epoch clean/PGD accuracy
            on its first ``config.eval_samples`` images (without it those are None).
        config: TrainConfig (the paper's recipe by default).
        out_dir: where checkpoint.pt, history.json and metrics.csv are written
            after every epoch (nothing is written when None).
        resume: a checkpoint file or folder to continue from.
        model_spec: JSON-able description stored in the checkpoint so
            ``python -m pni_fast eval`` can rebuild the model.
        on_epoch: called with each epoch's record (after its checkpoint is written; on every rank).
        overwrite: allow ``out_dir`` to hold another run's files (they are
            deleted first); without it such a folder raises FileExistsError,
            unless ``resume`` is that folder's own checkpoint.
        rank_noise: ``'same'`` or ``'independent'``: how PNI noise relates across data-parallel ranks
            (see below and `pni_fast.distributed`). None: ``'same'`` in a process group; in a single
            process the noise then comes from torch's generator as always. Given in a single process,
            the per-epoch noise streams of a data-parallel run are used (a 1-process reference run).
        distributed: None uses the initialized ``torch.distributed`` process group if there is one,
            False ignores it, True requires it.
    Returns:
        The list of per-epoch records (loss, accuracies, lr, mean alpha per layer).

    On CPU, ``torch.set_flush_denormal(True)`` (what the CLI does) avoids a
    ~10x slowdown once gradients become subnormal.

    A fresh run calls ``torch.manual_seed(config.seed)`` first (PNI noise is
    drawn from torch's default generator), so a run is reproducible from its
    config; a resumed run restores the generator states from the checkpoint.
    Resuming a checkpoint that already holds ``config.epochs`` epochs trains
    nothing: it warns and returns the checkpoint's history.

    **Data parallel** (a process group is initialized, e.g. ``torchrun --nproc_per_node N``): the model
    is wrapped in ``DistributedDataParallel`` (``find_unused_parameters=False``); ``config.batch_size``
    is the global batch (it must be divisible by N): with a `Split` every rank takes its strided shard
    of each global batch of the epoch's permutation, so N ranks see exactly the batches of one process.
    With a DataLoader give each rank its shard (``DistributedSampler``, per-rank batch size) and the same
    number of batches. Metrics are summed over ranks; test evaluation, logs and checkpoints are rank 0's
    (the checkpoint holds the unwrapped model); all ranks load ``resume``. PGD runs on the unwrapped
    model (no gradient sync, no DDP bookkeeping for the input-gradient passes). BatchNorm uses each
    rank's batch statistics, as in any DDP run. PyTorch's and PNI's generators are reseeded every epoch
    from ``(config.seed, epoch, rank)`` -- PNI's from ``(config.seed, epoch)`` only under
    ``rank_noise='same'`` (the default: every rank draws the same noise, so the step is one noisy
    model's step over the global batch, equal to one process's up to the rounding of DDP's average;
    ``'independent'`` gives each rank its own noise, N noise samples per step for the alpha gradient,
    at the price of a result that depends on N). A `no_noise` forward through a DDP model leaves the
    alphas without a gradient, which DDP reports at the next step; run such forwards through
    ``ddp.module`` or build DDP with ``find_unused_parameters=True``.
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_batch_source(train_data, "train_data")
    if test_data is not None:
        check_batch_source(test_data, "test_data")
    ctx = _dist.context(distributed)
    streams = ctx.active or rank_noise is not None
    if streams:
        rank_noise = _dist.check_rank_noise(_dist.DEFAULT_RANK_NOISE if rank_noise is None else rank_noise)
    in_memory = isinstance(train_data, Split)
    if not in_memory and config.augment:
        raise ValueError("config.augment (crop+flip) applies to Split data; with a DataLoader or another iterable, "
                         "augment in its dataset/transforms and pass augment=False")
    if in_memory and config.batch_size % ctx.world_size:
        raise ValueError(f"batch_size ({config.batch_size}) is the global batch and must be divisible by the "
                         f"number of processes ({ctx.world_size})")
    started = time.time()
    dev = resolve_device(device)
    if ctx.active and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)  # nccl's collectives (rank 0's record, metric sums) run on this GPU
    model.to(dev)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resume is not None:
        resume = os.fspath(resume)
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        _dist.rank0_call(ctx, lambda: _prepare_out_dir(out_dir, resume, overwrite, started))
    run_info = {"rank_noise": rank_noise, "world_size": ctx.world_size} if streams else None

    def warn(msg: str) -> None:
        if ctx.is_main:
            warnings.warn(msg, stacklevel=3)

    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=dev)
        old = ckpt.get("config", {})
        diff = {k: (old.get(k), v) for k, v in config.to_dict().items() if k != "epochs" and k in old and _norm(old.get(k)) != _norm(v)}
        if ckpt.get("streams") != run_info:
            diff["noise streams"] = (ckpt.get("streams"), run_info)
        if diff:
            warn(f"resuming with settings that differ from the checkpoint's (old, new): {diff}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # the decay epochs follow this run's epoch count (resuming with more epochs stretches the
        # schedule): recompute the current lr in closed form from this config's milestones
        fresh = make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), config)
        scheduler.milestones = fresh.milestones
        n_decays = sum(c for m, c in fresh.milestones.items() if m <= scheduler.last_epoch)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * config.lr_gamma ** n_decays
        history = list(ckpt.get("history", []))
        start_epoch = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"])
        if model_spec is None:
            model_spec = ckpt.get("model_spec")
        if out_dir is not None:
            # logs of a crashed run may be ahead of its checkpoint
            _dist.rank0_call(ctx, lambda: _write_logs(out_dir, history))
        if start_epoch >= config.epochs:
            warn(f"checkpoint {resume!r} already holds {start_epoch} epochs (epochs={config.epochs}): nothing to train")
    else:
        torch.manual_seed(config.seed)
    if isinstance(train_data, collections.abc.Iterator) and config.epochs - start_epoch > 1:
        raise ValueError(f"train_data is a one-shot iterator (e.g. a generator) but {config.epochs - start_epoch} "
                         "epochs are to run: pass a re-iterable (a list, a DataLoader)")
    if ctx.active and ctx.world_size > 1 and isinstance(train_data, torch.utils.data.DataLoader) and not isinstance(
            train_data.sampler, torch.utils.data.distributed.DistributedSampler):
        warn("train_data is a DataLoader without a DistributedSampler: every rank trains on the same batches")

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    # bars redraw in place on a terminal; in a log file (CI, nohup) they would bury the results
    progress = progress and sys.stderr.isatty() and ctx.is_main
    fwd: nn.Module = model  # what the training forwards call; PGD always attacks the unwrapped model
    if ctx.active:
        fwd = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False)

    with contextlib.ExitStack() as stack:
        if streams:
            stack.enter_context(own_generator(0))  # PNI's previous generator is restored on the way out
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            if streams:
                torch.manual_seed(_dist.derived_seed(config.seed, "torch", epoch, ctx.rank))
                _pni_manual_seed(_dist.derived_seed(config.seed, "pni", epoch,
                                                    ctx.rank if rank_noise == "independent" else "all"))
            adv_on = config.adversarial and epoch >= config.warmup_epochs
            lr = optimizer.param_groups[0]["lr"]
            model.train()
            n_seen = loss_sum = 0.0
            clean_ok = adv_ok = 0
            if in_memory:
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
                batches = iterate_batches(train_data, config.batch_size, shuffle=True, augment=config.augment,
                                          generator=gen, device=dev, rank=ctx.rank, world_size=ctx.world_size)
                n_batches = math.ceil((len(train_data) - len(train_data) % ctx.world_size) / config.batch_size)
            else:
                _set_epoch(train_data, epoch)
                batches = iterate_user_batches(train_data, "train_data", dev)
                n_batches = _num_batches(train_data)
            bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch + 1}/{config.epochs}{' adv' if adv_on else ''}",
                       leave=False, disable=not progress, dynamic_ncols=True) if tqdm is not None else batches
            for x, y in bar:
                if adv_on:
                    with _noise_ctx(model, config.adv_noise):
                        x_adv = pgd(model, x, y, eps=config.adv_eps, alpha=config.adv_alpha, steps=config.adv_steps,
                                    random_start=config.adv_random_start, targets=config.adv_targets)
                logits = fwd(x)
                loss = F.cross_entropy(logits, y)
                if adv_on:
                    logits_adv = fwd(x_adv)
                    loss = config.clean_weight * loss + config.adv_weight * F.cross_entropy(logits_adv, y)
                    adv_ok += int((logits_adv.argmax(1) == y).sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                b = int(y.shape[0])
                n_seen += b
                loss_sum += float(loss.detach()) * b
                clean_ok += int((logits.argmax(1) == y).sum())
                if tqdm is not None and progress:
                    bar.set_postfix(loss=f"{loss_sum / n_seen:.3f}", acc=f"{clean_ok / n_seen:.3f}")
            if ctx.active:
                loss_sum, n_seen, clean_ok, adv_ok = _dist.all_sum(ctx, [loss_sum, n_seen, clean_ok, adv_ok])
                _dist.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, as DDP uses at each forward
            if not in_memory and n_seen == 0:
                raise ValueError(f"train_data yielded no batches in epoch {epoch + 1}")
            scheduler.step()

            def finish(epoch=epoch, t0=t0, adv_on=adv_on, lr=lr, n_seen=n_seen, loss_sum=loss_sum,
                       clean_ok=clean_ok, adv_ok=adv_ok) -> Dict[str, Any]:
                test_clean, test_adv = (None, None)
                if test_data is not None:
                    test_clean, test_adv = _evaluate_epoch(model, test_data, config, dev)
                record = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "adversarial": adv_on,
                    "train_loss": loss_sum / max(n_seen, 1),
                    "train_clean_acc": clean_ok / max(n_seen, 1),
                    "train_adv_acc": adv_ok / n_seen if adv_on and n_seen else None,
                    "test_clean_acc": test_clean,
                    "test_adv_acc": test_adv,
                    "alpha": alpha_means(model),
                    "time_s": time.perf_counter() - t0,
                }
                record["alpha_mean"] = float(np.mean(list(record["alpha"].values()))) if record["alpha"] else None
                if out_dir is not None:
                    state = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                        "history": history + [record],
                        "rng": _rng_state(),
                        "config": config.to_dict(),
                        "model_spec": model_spec,
                    }
                    if run_info is not None:
                        state["streams"] = run_info
                    save_checkpoint(os.path.join(out_dir, CHECKPOINT_NAME), state)
                    _write_logs(out_dir, history + [record])  # after the checkpoint: the logs never run ahead of it
                return record

            # rank 0 evaluates and writes; the others wait for its record (an error there stops every rank)
            record = _dist.rank0_call(ctx, finish)
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
    return history


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
