"""One epoch of `pni_fast.robust.train.train`: the training pass, then (rank 0) evaluation,
the epoch's record, the checkpoint and the logs."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as _dist
from .attacks import pgd
from .checkpoint import CHECKPOINT_NAME, save_checkpoint
from .checkpoint import rng_state as _rng_state
from .checkpoint import write_logs as _write_logs
from .config import TrainConfig
from .data import Split, iterate_batches, iterate_user_batches
from .modes import model_mode

__all__ = ["alpha_means"]


def alpha_means(model: nn.Module) -> dict[str, float]:
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
    from ..nn.control import no_noise
    from ..nn.layers import is_noisy_module

    if not any(is_noisy_module(m) for m in model.modules()):
        yield model  # a plain model has no noise to switch off
        return
    with no_noise(model):
        yield model


def _first(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], limit: Optional[int]):
    """The batches of ``batches`` up to ``limit`` examples in all (the last one cut), then stop reading."""
    left = limit
    for x, y in batches:
        if left is not None:
            if left <= 0:
                return
            x, y = x[:left], y[:left]
            left -= int(y.shape[0])
        yield x, y


def evaluate_epoch(
    model: nn.Module, test: Any, config: TrainConfig, device: torch.device
) -> tuple[float, Optional[float]]:
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
                xa = pgd(
                    model,
                    x,
                    y,
                    eps=config.adv_eps,
                    alpha=config.adv_alpha,
                    steps=config.eval_pgd_steps,
                    random_start=True,
                    targets=config.adv_targets,
                )
                with torch.no_grad():
                    adv += int((model(xa).argmax(1) == y).sum())
    if n == 0:
        return float("nan"), None
    return clean / n, (adv / n if config.adversarial else None)


def _set_epoch(data: Any, epoch: int) -> None:
    """``set_epoch`` on a DataLoader's sampler / batch sampler (DistributedSampler reshuffles per epoch)."""
    seen = set()
    for s in (
        getattr(data, "sampler", None),
        getattr(getattr(data, "batch_sampler", None), "sampler", None),
        getattr(data, "batch_sampler", None),
    ):
        if s is not None and id(s) not in seen and callable(getattr(s, "set_epoch", None)):
            seen.add(id(s))
            s.set_epoch(epoch)


def _num_batches(data: Any) -> Optional[int]:
    try:
        return len(data)
    except TypeError:
        return None


@dataclass
class EpochRun:
    """What the steps of one `train` call share."""

    model: nn.Module
    fwd: nn.Module  # what the training forwards call: the model, or its DDP wrapper
    config: TrainConfig
    ctx: Any
    dev: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    model_spec: Optional[dict[str, Any]]
    out_dir: Optional[str]
    run_info: Optional[dict[str, Any]]  # the noise streams of a data-parallel run, stored in the checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    progress: bool = False

    def warn(self, msg: str) -> None:
        if self.ctx.is_main:
            warnings.warn(msg, stacklevel=4)


def _progress_bar(run: EpochRun, batches, total: Optional[int], desc: str):
    """tqdm around ``batches`` when bars are shown and tqdm is installed, else ``batches`` itself."""
    if not run.progress:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional (pni_fast[robust]): train without bars
        return batches
    return tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_epoch(run: EpochRun, train_data: Any, epoch: int) -> dict[str, Any]:
    """One epoch of (adversarial) training; returns its sums (over all ranks) for the epoch's record."""
    config, ctx, dev, model = run.config, run.ctx, run.dev, run.model
    t0 = time.perf_counter()
    adv_on = config.adversarial and epoch >= config.warmup_epochs
    lr = run.optimizer.param_groups[0]["lr"]
    model.train()
    n_seen = loss_sum = 0.0
    clean_ok = adv_ok = 0
    if isinstance(train_data, Split):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        batches = iterate_batches(
            train_data,
            config.batch_size,
            shuffle=True,
            augment=config.augment,
            generator=gen,
            device=dev,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        n_batches = math.ceil((len(train_data) - len(train_data) % ctx.world_size) / config.batch_size)
    else:
        _set_epoch(train_data, epoch)
        batches = iterate_user_batches(train_data, "train_data", dev)
        n_batches = _num_batches(train_data)
    bar = _progress_bar(run, batches, n_batches, f"epoch {epoch + 1}/{config.epochs}{' adv' if adv_on else ''}")
    for x, y in bar:
        if adv_on:
            with _noise_ctx(model, config.adv_noise):
                x_adv = pgd(
                    model,
                    x,
                    y,
                    eps=config.adv_eps,
                    alpha=config.adv_alpha,
                    steps=config.adv_steps,
                    random_start=config.adv_random_start,
                    targets=config.adv_targets,
                )
        logits = run.fwd(x)
        loss = F.cross_entropy(logits, y)
        if adv_on:
            logits_adv = run.fwd(x_adv)
            loss = config.clean_weight * loss + config.adv_weight * F.cross_entropy(logits_adv, y)
            adv_ok += int((logits_adv.argmax(1) == y).sum())
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        b = int(y.shape[0])
        n_seen += b
        loss_sum += float(loss.detach()) * b
        clean_ok += int((logits.argmax(1) == y).sum())
        if bar is not batches:
            bar.set_postfix(loss=f"{loss_sum / n_seen:.3f}", acc=f"{clean_ok / n_seen:.3f}")
    if ctx.active:
        loss_sum, n_seen, clean_ok, adv_ok = _dist.all_sum(ctx, [loss_sum, n_seen, clean_ok, adv_ok])
        _dist.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, as DDP uses at each forward
    if not isinstance(train_data, Split) and n_seen == 0:
        raise ValueError(f"train_data yielded no batches in epoch {epoch + 1}")
    run.scheduler.step()
    return {
        "epoch": epoch,
        "t0": t0,
        "adv_on": adv_on,
        "lr": lr,
        "n_seen": n_seen,
        "loss_sum": loss_sum,
        "clean_ok": clean_ok,
        "adv_ok": adv_ok,
    }


def finish_epoch(run: EpochRun, test_data: Any, s: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: evaluate on the test data, build the epoch's record, save checkpoint then logs."""
    test_clean, test_adv = (None, None)
    if test_data is not None:
        test_clean, test_adv = evaluate_epoch(run.model, test_data, run.config, run.dev)
    n_seen = s["n_seen"]
    record = {
        "epoch": s["epoch"] + 1,
        "lr": s["lr"],
        "adversarial": s["adv_on"],
        "train_loss": s["loss_sum"] / max(n_seen, 1),
        "train_clean_acc": s["clean_ok"] / max(n_seen, 1),
        "train_adv_acc": s["adv_ok"] / n_seen if s["adv_on"] and n_seen else None,
        "test_clean_acc": test_clean,
        "test_adv_acc": test_adv,
        "alpha": alpha_means(run.model),
        "time_s": time.perf_counter() - s["t0"],
    }
    record["alpha_mean"] = float(np.mean(list(record["alpha"].values()))) if record["alpha"] else None
    if run.out_dir is not None:
        _save(run, record)
    return record


def _save(run: EpochRun, record: dict[str, Any]) -> None:
    """Checkpoint of the epoch just finished, then the logs (which so never run ahead of it)."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": record["epoch"],
        "history": run.history + [record],
        "rng": _rng_state(),
        "config": run.config.to_dict(),
        "model_spec": run.model_spec,
    }
    if run.run_info is not None:
        state["streams"] = run.run_info
    save_checkpoint(os.path.join(run.out_dir, CHECKPOINT_NAME), state)
    _write_logs(run.out_dir, run.history + [record])
