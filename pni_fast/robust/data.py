"""Data for training and evaluating PNI models, without downloads or torchvision.

- ``load_digits``: scikit-learn's bundled 8x8 digits (1,797 images, shipped
  inside the sklearn wheel), scaled to [0, 1], with a fixed stratified split.
  This is the embedded default: the demo and the tests need nothing else.
- ``load_cifar10``: CIFAR-10 from the standard python-pickle batches
  (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) in a local folder.
  The batches are read with a restricted unpickler (`safe_load_pickle`) that
  builds only dicts, lists, tuples, bytes, str, numbers and numpy arrays, so a
  crafted file cannot run code; shapes, dtypes and labels are checked at load
  time. Images stay ``uint8`` in memory (150 MB instead of 600 MB as float32);
  `iterate_batches` / `to_unit_float` convert each batch to float in [0, 1].
- ``random_crop_flip``: the standard CIFAR augmentation (random crop with
  zero padding 4, horizontal flip) on whole batches with torch ops.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._deps import require
from .checks import check_int

__all__ = [
    "Split",
    "load_digits",
    "load_cifar10",
    "safe_load_pickle",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILE",
    "CIFAR10_CLASSES",
    "to_unit_float",
    "random_crop_flip",
    "iterate_batches",
    "iterate_user_batches",
    "check_batch_source",
]

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass
class Split:
    """A labelled image set: ``x`` is [N, C, H, W] (float in [0, 1] or uint8 in [0, 255]), ``y`` int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(f"x must be [N, C, H, W], got shape {tuple(self.x.shape)}")
        if self.y.shape != self.x.shape[:1]:
            raise ValueError(f"y must have shape [{self.x.shape[0]}], got {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.y.max().item()) + 1 if len(self) else 0

    def subset(self, n: Optional[int]) -> Split:
        """The first n examples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        check_int("n", n, 0)
        return Split(self.x[:n], self.y[:n])


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's digits as ([N,1,8,8] float32 in [0,1], int64 labels), stratified train/test split.

    The split depends only on ``test_fraction`` and ``seed`` (default 1,437
    train / 360 test images), so results are comparable across runs.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    datasets = require("sklearn.datasets", "the embedded digits data set")
    train_test_split = require("sklearn.model_selection", "the embedded digits data set").train_test_split
    bunch = datasets.load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    tr.sort()
    te.sort()

    def make(ix: np.ndarray) -> Split:
        return Split(torch.from_numpy(images[ix]).unsqueeze(1).contiguous(), torch.from_numpy(labels[ix]))

    return make(tr), make(te)


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What a protocol-2 pickle written by Python 3 uses to store bytes; only latin-1 is accepted."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(obj).__name__}, {encoding!r}, {errors!r})")
    return obj.encode("latin-1")


def _numpy_global(name: str) -> Callable[..., Any]:
    """numpy's array-unpickling helpers (numpy._core in numpy 2, numpy.core in numpy 1)."""
    module = {"_reconstruct": "multiarray", "_frombuffer": "numeric"}[name]
    for pkg in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{pkg}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {name} to unpickle arrays with")  # pragma: no cover


# (module, name) -> how to get the object. Nothing else may be loaded.
_SAFE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}
for _pkg in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_pkg}.multiarray", "_reconstruct")] = lambda: _numpy_global("_reconstruct")
    _SAFE_GLOBALS[(f"{_pkg}.numeric", "_frombuffer")] = lambda: _numpy_global("_frombuffer")


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds builtin containers, bytes, str, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        get = _SAFE_GLOBALS.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name} (only builtin containers, bytes, str, numbers and "
                "numpy arrays are allowed; the file may be crafted to run code)"
            )
        return get()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id (not allowed in a data file)")


def safe_load_pickle(path: Union[str, os.PathLike], encoding: str = "bytes") -> Any:
    """Unpickle ``path`` without running code: only containers, bytes, str, numbers and numpy arrays.

    Raises ValueError naming the file (and the refused global) for anything else.
    ``encoding="bytes"`` reads Python 2 pickles (the CIFAR-10 batches) as bytes.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, encoding=encoding).load()
        except Exception as e:
            raise ValueError(f"{path}: cannot read it as a safe python pickle: {e}") from None


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file -> (uint8 [N, 3, 32, 32], int64 [N] labels in [0, 10)), checked."""
    d = safe_load_pickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (expected a dict, got {type(d).__name__})")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch (keys 'data' and 'labels' missing, has {sorted(map(str, d))})"
        )
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        what = f"array of dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 numpy array, got {what}")
    if data.ndim == 2 and data.shape[1] == 3 * 32 * 32:
        data = data.reshape(-1, 3, 32, 32)
    elif data.ndim != 4 or data.shape[1:] != (3, 32, 32):
        raise ValueError(f"{path}: 'data' must have shape [N, 3072] or [N, 3, 32, 32], got {list(data.shape)}")
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"{path}: 'labels' must be a 1-D integer array, got dtype {labels.dtype} shape {list(labels.shape)}"
            )
    elif isinstance(labels, (list, tuple)):
        bad = next((v for v in labels if isinstance(v, bool) or not isinstance(v, int)), None)
        if bad is not None:
            raise ValueError(f"{path}: 'labels' must hold integers, got {type(bad).__name__} {bad!r}")
    else:
        raise ValueError(f"{path}: 'labels' must be a list of integers, got {type(labels).__name__}")
    if len(labels) != data.shape[0]:
        raise ValueError(f"{path}: expected one label per image, got {data.shape[0]} images and {len(labels)} labels")
    k = len(CIFAR10_CLASSES)
    out_of_range = [i for i, v in enumerate(labels) if not 0 <= int(v) < k]
    if out_of_range:
        i = out_of_range[0]
        raise ValueError(
            f"{path}: labels must lie in [0, {k}), got {int(labels[i])} at index {i} ({len(out_of_range)} out of range)"
        )
    return np.ascontiguousarray(data), np.asarray(labels, dtype=np.int64).reshape(-1)


def load_cifar10(data_dir: Union[str, os.PathLike]) -> tuple[Split, Split]:
    """CIFAR-10 from the python-pickle batches in ``data_dir`` (the folder ``cifar-10-batches-py``).

    Returns (train, test) with ``x`` as uint8 [N, 3, 32, 32]. Raises
    FileNotFoundError naming every missing file when the folder is wrong.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"CIFAR-10 folder {data_dir!r} does not exist; pass the folder that holds "
            f"{', '.join(CIFAR10_TRAIN_FILES)} and {CIFAR10_TEST_FILE} (the python version, 'cifar-10-batches-py')"
        )
    names = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
    missing = [n for n in names if not os.path.isfile(os.path.join(data_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 folder {data_dir!r} lacks {', '.join(missing)}; expected the python-pickle batches "
            f"{', '.join(names)} (the 'cifar-10-batches-py' folder of the python version)"
        )
    parts = [_read_cifar_batch(os.path.join(data_dir, n)) for n in CIFAR10_TRAIN_FILES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(os.path.join(data_dir, CIFAR10_TEST_FILE))
    return (
        Split(torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr)),
        Split(torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte)),
    )


def to_unit_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images are cast only."""
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"x must be uint8 or floating point, got dtype {x.dtype}")
    return x.to(dtype)


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Random crop (after zero padding) and random horizontal flip, per image, on a [N, C, H, W] batch."""
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    check_int("padding", padding, 0)
    n, c, h, w = x.shape
    out = x
    if padding > 0 and n > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (oy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [N, H]
        cols = (ox[:, None] + torch.arange(w)[None, :]).to(x.device)  # [N, W]
        bidx = torch.arange(n, device=x.device)[:, None, None]
        # advanced indexing -> [N, H, W, C]; put channels back
        out = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if flip and n > 0:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
        out = torch.where(mask, out.flip(3), out)
    return out


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x float in [0,1], y int64) batches on ``device``; shuffling and augmentation use ``generator``.

    With ``world_size > 1`` (data-parallel training) ``batch_size`` is the global batch: the permutation is
    cut to a multiple of ``world_size`` (at most ``world_size - 1`` examples left out per epoch, as
    ``DistributedSampler(drop_last=True)``), and rank ``r`` gets elements ``r, r + world_size, ...`` of every
    global batch (its shard of the permutation), augmented exactly as the global batch would be. Every rank
    passes the same ``generator`` state, so the ranks' batches together are the one-process global batches.
    """
    check_int("batch_size", batch_size, 1)
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0, world_size - 1)
    if batch_size % world_size:
        raise ValueError(
            f"batch_size ({batch_size}) is the global batch and must be divisible by the number of "
            f"processes ({world_size})"
        )
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        n -= n % world_size
        order = order[:n]
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        xb = to_unit_float(split.x[idx])
        if augment:
            xb = random_crop_flip(xb, generator=generator)
        yb = split.y[idx]
        if world_size > 1:
            xb, yb = xb[rank::world_size].contiguous(), yb[rank::world_size]
        if device is not None:
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
        yield xb, yb


def check_batch_source(data: Any, what: str) -> None:
    """Refuse what cannot be a source of ``(x, y)`` batches, with the fix in the message."""
    if isinstance(data, Split):
        return
    tensors = isinstance(data, (tuple, list)) and data and all(isinstance(v, torch.Tensor) for v in data)
    if isinstance(data, torch.Tensor) or tensors:
        raise TypeError(
            f"{what} looks like tensors, not batches: wrap an (x, y) pair as pni_fast.robust.data.Split(x, y), "
            "or pass an iterable of (x, y) batches (a list, a torch.utils.data.DataLoader)"
        )
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError(
            f"{what} is a Dataset of single examples; wrap it in a torch.utils.data.DataLoader "
            "(batch_size=..., shuffle=True, or a DistributedSampler under torchrun)"
        )
    if not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):  # no iter(): it would start loader workers
        raise TypeError(
            f"{what} must be a pni_fast.robust.data.Split or an iterable of (x, y) batches (e.g. a "
            f"torch.utils.data.DataLoader), got {type(data).__name__}"
        )


def iterate_user_batches(
    data: Iterable, what: str, device: Union[str, torch.device, None] = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the ``(x, y)`` batches of any iterable (a DataLoader, a list, a generator), checked and moved to
    ``device``: ``x`` uint8 becomes float in [0, 1], floating ``x`` is kept as given; ``y`` integer class labels."""
    for i, item in enumerate(data):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"{what} must yield (x, y) pairs; batch {i} is a {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            )
        x, y = item
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(
                f"{what}: batch {i} must be a pair of tensors, got ({type(x).__name__}, {type(y).__name__})"
            )
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"{what}: batch {i} x must be uint8 or floating point (images in [0, 1]), got {x.dtype}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{what}: batch {i} y must hold integer class labels, got {y.dtype}")
        if x.dim() < 2 or y.shape != x.shape[:1]:
            raise ValueError(
                f"{what}: batch {i} must be x [N, ...] with y [N], got x {list(x.shape)}, y {list(y.shape)}"
            )
        if x.dtype == torch.uint8:
            x = to_unit_float(x)
        y = y.long()
        if device is not None:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
        yield x, y
