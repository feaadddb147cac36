"""PGD adversarial training with PNI, the paper's recipe as the default (`TrainConfig`, in
`pni_fast.robust.config`).

The adversarial batch is generated on the model in eval mode with its noise on
(`attacks.pgd` attacks in eval mode by default, and restores the mode):
BatchNorm uses and does not update its running statistics, exactly as for an
eval-mode copy of the model, without the cost of copying it every batch.

Checkpoints hold model, optimizer, scheduler, completed epochs, history, RNG
states and config; they are written atomically (temp file + ``os.replace``)
after every epoch with a sha256 checksum (`pni_fast.robust.checkpoint`), so a crash
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
``DistributedDataParallel``; see `train` and `pni_fast.robust.distributed`.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from ..rng import manual_seed as _pni_manual_seed
from ..rng import own_generator
from . import distributed as _dist
from .checkpoint import (
    CHECKPOINT_NAME,
    RUN_FILES,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from .checkpoint import prepare_out_dir as _prepare_out_dir
from .checkpoint import set_rng_state as _set_rng_state
from .checkpoint import write_logs as _write_logs
from .config import TrainConfig, make_optimizer, make_scheduler, resolve_device
from .data import Split, check_batch_source
from .epoch import EpochRun, finish_epoch, train_epoch

__all__ = [
    "TrainConfig",
    "train",
    "make_optimizer",
    "make_scheduler",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_device",
    "CHECKPOINT_NAME",
    "CheckpointError",
    "RUN_FILES",
]


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
    model_spec: Optional[dict[str, Any]] = None,
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
    overwrite: bool = False,
    rank_noise: Optional[str] = None,
    distributed: Optional[bool] = None,
) -> list[dict[str, Any]]:
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
            (see below and `pni_fast.robust.distributed`). None: ``'same'`` in a process group; in a single
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
    model's step over the global batch, equal to one process's up to the rounding of DDP's average
    when the model has no BatchNorm and PGD no random start;
    ``'independent'`` gives each rank its own noise, N noise samples per step for the alpha gradient,
    at the price of a result that depends on N). A `no_noise` forward through a DDP model leaves the
    alphas without a gradient, which DDP reports at the next step; run such forwards through
    ``ddp.module`` or build DDP with ``find_unused_parameters=True``.
    """
    config, ctx, streams, rank_noise = _check_args(config, train_data, test_data, rank_noise, distributed)
    started = time.time()
    dev = resolve_device(device)
    if ctx.active and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)  # nccl's collectives (rank 0's record, metric sums) run on this GPU
    model.to(dev)
    optimizer = make_optimizer(model, config)
    run = EpochRun(
        model=model,
        fwd=model,
        config=config,
        ctx=ctx,
        dev=dev,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config),
        model_spec=model_spec,
        out_dir=None if out_dir is None else os.fspath(out_dir),
        run_info={"rank_noise": rank_noise, "world_size": ctx.world_size} if streams else None,
    )
    resume = None if resume is None else os.fspath(resume)
    if run.out_dir is not None:
        _dist.rank0_call(ctx, lambda: _prepare_out_dir(run.out_dir, resume, overwrite, started))
    if resume is not None:
        _resume(run, resume)
    else:
        torch.manual_seed(config.seed)
    if isinstance(train_data, collections.abc.Iterator) and config.epochs - run.start_epoch > 1:
        raise ValueError(
            f"train_data is a one-shot iterator (e.g. a generator) but {config.epochs - run.start_epoch} "
            "epochs are to run: pass a re-iterable (a list, a DataLoader)"
        )
    if (
        ctx.active
        and ctx.world_size > 1
        and isinstance(train_data, torch.utils.data.DataLoader)
        and not isinstance(train_data.sampler, torch.utils.data.distributed.DistributedSampler)
    ):
        run.warn("train_data is a DataLoader without a DistributedSampler: every rank trains on the same batches")
    # bars redraw in place on a terminal; in a log file (CI, nohup) they would bury the results
    run.progress = progress and sys.stderr.isatty() and ctx.is_main
    if ctx.active:  # the training forwards go through DDP; PGD always attacks the unwrapped model
        run.fwd = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False
        )

    with contextlib.ExitStack() as stack:
        if streams:
            stack.enter_context(own_generator(0))  # PNI's previous generator is restored on the way out
        for epoch in range(run.start_epoch, config.epochs):
            if streams:
                torch.manual_seed(_dist.derived_seed(config.seed, "torch", epoch, ctx.rank))
                _pni_manual_seed(
                    _dist.derived_seed(config.seed, "pni", epoch, ctx.rank if rank_noise == "independent" else "all")
                )
            stats = train_epoch(run, train_data, epoch)
            # rank 0 evaluates and writes; the others wait for its record (an error there stops every rank)
            record = _dist.rank0_call(ctx, lambda: finish_epoch(run, test_data, stats))
            run.history.append(record)
            if on_epoch is not None:
                on_epoch(record)
    return run.history


def _check_args(config, train_data, test_data, rank_noise, distributed):
    """The checked config, the process-group context, whether per-epoch noise streams are used, and which."""
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
        raise ValueError(
            "config.augment (crop+flip) applies to Split data; with a DataLoader or another iterable, "
            "augment in its dataset/transforms and pass augment=False"
        )
    if in_memory and config.batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size ({config.batch_size}) is the global batch and must be divisible by the "
            f"number of processes ({ctx.world_size})"
        )
    return config, ctx, streams, rank_noise


def _resume(run: EpochRun, resume: str) -> None:
    """Load model, optimizer, schedule, history and RNG states from ``resume``; warn about changed settings."""
    config = run.config
    ckpt = load_checkpoint(resume, map_location=run.dev)
    old = ckpt.get("config", {})
    diff = {
        k: (old.get(k), v)
        for k, v in config.to_dict().items()
        if k != "epochs" and k in old and _norm(old.get(k)) != _norm(v)
    }
    if ckpt.get("streams") != run.run_info:
        diff["noise streams"] = (ckpt.get("streams"), run.run_info)
    if diff:
        run.warn(f"resuming with settings that differ from the checkpoint's (old, new): {diff}")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    # the decay epochs follow this run's epoch count (resuming with more epochs stretches the
    # schedule): recompute the current lr in closed form from this config's milestones
    fresh = make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), config)
    run.scheduler.milestones = fresh.milestones
    n_decays = sum(c for m, c in fresh.milestones.items() if m <= run.scheduler.last_epoch)
    for g in run.optimizer.param_groups:
        g["lr"] = g["initial_lr"] * config.lr_gamma**n_decays
    run.history = list(ckpt.get("history", []))
    run.start_epoch = int(ckpt["epoch"])
    _set_rng_state(ckpt["rng"])
    if run.model_spec is None:
        run.model_spec = ckpt.get("model_spec")
    if run.out_dir is not None:  # logs of a crashed run may be ahead of its checkpoint
        _dist.rank0_call(run.ctx, lambda: _write_logs(run.out_dir, run.history))
    if run.start_epoch >= config.epochs:
        run.warn(
            f"checkpoint {resume!r} already holds {run.start_epoch} epochs (epochs={config.epochs}): nothing to train"
        )


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
