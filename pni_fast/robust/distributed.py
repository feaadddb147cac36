"""Data-parallel training helpers: process group set-up from ``torchrun``, per-rank random streams, rank-0 work.

``python -m pni_fast train`` under ``torchrun --nproc_per_node N`` calls :func:`init_from_env` (gloo on CPU,
nccl on CUDA, one GPU per process: ``cuda:LOCAL_RANK``), trains with `pni_fast.train.train` (which wraps the
model in ``DistributedDataParallel`` once a process group exists) and calls :func:`teardown` on the way out.

**Noise across ranks** (``rank_noise``):

* ``"same"`` (default): every rank seeds PNI's own generator (:func:`pni_fast.manual_seed`) with the same
  value, so all ranks draw the same noise for each step. The model is then one random function per step,
  DDP's gradient average is an unbiased gradient estimate of that one noisy model over the global batch
  (what the paper's single-GPU training does). Without BatchNorm and PGD random starts, N ranks compute
  what one process computes over the same global batch (up to the rounding of the average). BatchNorm
  normalizes each rank's share with its own statistics (rank 0's running statistics are kept;
  ``SyncBatchNorm`` refuses CPU tensors) and random starts come from each rank's PyTorch stream, so with
  them the step depends on N (tests/robust/test_distributed.py).
* ``"independent"``: each rank draws its own noise stream (the seed is derived from the run's seed and the
  rank). The alpha gradient then averages N noise samples per step (lower variance), but the step is no
  longer the step of one process, and the result depends on the number of ranks.

Both streams are reseeded at the start of every epoch from ``(seed, epoch[, rank])`` (with PyTorch's
generator, which draws PGD's random starts and dropout masks, seeded per rank), so a resumed run continues
bit-for-bit without saving per-rank generator states.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "RANK_NOISE",
    "DEFAULT_RANK_NOISE",
    "DistContext",
    "check_rank_noise",
    "context",
    "derived_seed",
    "launched_by_torchrun",
    "init_from_env",
    "finish",
    "teardown",
    "rank0_call",
    "all_sum",
    "broadcast_buffers",
]

RANK_NOISE = ("same", "independent")
DEFAULT_RANK_NOISE = "same"
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``active`` is True inside an initialized process group."""

    active: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_rank_noise(value: Any) -> str:
    if not isinstance(value, str) or value not in RANK_NOISE:
        raise ValueError(f"rank_noise must be 'same' or 'independent', got {value!r}")
    return value


def context(distributed: Optional[bool] = None) -> DistContext:
    """The process group's rank and size; ``distributed=None`` uses the group if one is initialized,
    ``False`` ignores it, ``True`` requires it."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
    up = dist.is_available() and dist.is_initialized()
    if distributed and not up:
        raise RuntimeError(
            "distributed=True needs an initialized process group: launch with torchrun and call "
            "torch.distributed.init_process_group() (or pni_fast.robust.distributed.init_from_env()) first"
        )
    if not up or distributed is False:
        return DistContext()
    return DistContext(True, dist.get_rank(), dist.get_world_size())


def derived_seed(seed: int, *parts: Any) -> int:
    """A seed in [0, 2**63) derived from ``seed`` and ``parts`` (sha256: unrelated streams for neighbouring
    inputs, the same value on every machine and Python version)."""
    text = "pni_fast/" + "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def launched_by_torchrun() -> bool:
    """True when the environment of ``torchrun`` (or another env:// launcher) is set: RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "auto") -> torch.device:
    """Initialize the default process group from torchrun's environment; returns this process's device.

    Outside torchrun nothing is initialized and ``device`` is resolved as usual ('auto' -> cuda if
    available). Under torchrun: CUDA ('auto' with a GPU, or 'cuda') -> ``cuda:LOCAL_RANK`` with nccl; CPU ->
    gloo. An explicit GPU index is refused when several processes run (each process owns one GPU).
    """
    dev = torch.device(
        "cuda"
        if device in (None, "auto") and torch.cuda.is_available()
        else ("cpu" if device in (None, "auto") else device)
    )
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return dev
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; run a single process")
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if dev.index is not None and world > 1:
            raise ValueError(
                f"--device {device} under torchrun with {world} processes: each process uses "
                "cuda:LOCAL_RANK; pass --device cuda (or auto)"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device {device}: distributed training supports cpu (gloo) and cuda (nccl)")
    dist.init_process_group(backend=backend)
    return dev


def finish() -> None:
    """Wait until every rank got here (a finished run): a rank that tears its group down while a peer is still
    in a collective can take that peer down with it (gloo aborts it at exit)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank0_call(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank. An exception on rank 0 is re-raised
    there and raised on the other ranks as a RuntimeError naming it, so no rank waits forever."""
    if not ctx.active:
        return fn()
    box: list = [None]
    err: Optional[BaseException] = None
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # shared with the other ranks below, then re-raised
            err = e
            etype = type(e)
            try:
                pickle.dumps(etype)
            except Exception:
                etype = RuntimeError  # a class the other ranks could not rebuild
            box[0] = ("error", (etype, f"{type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    status, value = box[0]
    if err is not None:
        raise err
    if status == "error":
        etype, text = value
        try:  # the same kind of error on every rank (the CLI turns ValueError/OSError into one line)
            exc = etype(f"rank 0 failed: {text}")
        except Exception:
            exc = RuntimeError(f"rank 0 failed: {text}")
        raise exc
    return value


def all_sum(ctx: DistContext, values: Sequence[float]) -> list:
    """Sum of ``values`` over all ranks (float64); the values themselves without a process group."""
    if not ctx.active:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all ranks hold the same model."""
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
