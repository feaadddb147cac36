"""Training checkpoints on disk: checksummed, written atomically, loaded without running code.

File format (version 1)::

    PNI_FAST_CHECKPOINT 1\\n
    sha256 <64 hex digits> <payload length in bytes>\\n
    <payload: torch.save of the checkpoint dict>

The sha256 covers the payload, so a flipped bit or a truncated file is
reported as such instead of loading silently changed weights; the payload is
read with ``torch.load(weights_only=True)``. Files are written to
``<name>.tmp<pid>`` in the same folder, fsynced, renamed over the old file and
the folder is fsynced, so a crash leaves either the old or the new file.
Checkpoints of older pni_fast versions (a bare ``torch.save`` zip without a
checksum) still load, with a warning.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import random
import re
import warnings
from collections.abc import Iterable
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
    "remove_orphan_temp_files",
    "CHECKPOINT_NAME",
    "RUN_FILES",
    "rng_state",
    "set_rng_state",
    "write_logs",
    "prepare_out_dir",
]

CHECKPOINT_NAME = "checkpoint.pt"
MAGIC = b"PNI_FAST_CHECKPOINT 1\n"
_HEADER = re.compile(rb"sha256 ([0-9a-f]{64}) ([0-9]{1,15})\n")
_ZIP = b"PK\x03\x04"
_TMP = re.compile(r"\.tmp([0-9]+)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing parts, corrupted, truncated or not a checkpoint."""


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp<pid>`` + fsync + rename + fsync of the folder.

    The temp file is removed if anything (also KeyboardInterrupt) stops the write.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (owned by someone else) or cannot tell: keep its file
    return True


def remove_orphan_temp_files(folder: str, names: Iterable[str], started: float, grace_s: float = 60.0) -> list[str]:
    """Delete ``<name>.tmp<pid>`` files an interrupted writer left in ``folder``; returns their paths.

    A temp file is an orphan when its writer process is gone, when it carries
    this process's pid (no write is in flight at the start of a run), or when
    it was last written more than ``grace_s`` seconds before ``started`` (a
    write takes far less; another live run still writing keeps its file).
    """
    removed = []
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        for entry in entries:
            m = _TMP.fullmatch(entry[len(name) :]) if entry.startswith(name) else None
            if m is None:
                continue
            path = os.path.join(folder, entry)
            pid = int(m.group(1))
            try:
                old = os.path.getmtime(path) < started - grace_s
            except OSError:
                continue
            if pid == os.getpid() or not _pid_alive(pid) or old:
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed


def save_checkpoint(path: Union[str, os.PathLike], state: dict[str, Any]) -> None:
    """Serialize ``state`` with torch.save, prepend the checksum header, write atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = MAGIC + b"sha256 %s %d\n" % (hashlib.sha256(payload).hexdigest().encode(), len(payload))
    atomic_write_bytes(os.fspath(path), header + payload)


def _payload(path: str, raw: bytes) -> bytes:
    """The verified torch.save bytes inside ``raw``; CheckpointError on any mismatch."""
    if not raw:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): the run that wrote it was cut off")
    if raw.startswith(MAGIC):
        m = _HEADER.match(raw, len(MAGIC))
        if m is None:
            raise CheckpointError(f"checkpoint {path!r} has a damaged header (corrupted or truncated file)")
        digest, length = m.group(1).decode(), int(m.group(2))
        payload = raw[m.end() :]
        if len(payload) != length:
            raise CheckpointError(
                f"checkpoint {path!r} is {'truncated' if len(payload) < length else 'too long'}: "
                f"{len(payload)} payload bytes, the header says {length}"
            )
        actual = hashlib.sha256(payload).hexdigest()
        if actual != digest:
            raise CheckpointError(
                f"checkpoint {path!r} is corrupted: sha256 of its contents is {actual[:16]}..., "
                f"the header says {digest[:16]}... (a changed byte, e.g. disk or copy error)"
            )
        return payload
    if raw.startswith(_ZIP):
        return raw  # an older pni_fast's bare torch.save: nothing to verify
    raise CheckpointError(f"{path!r} is not a pni_fast checkpoint (unrecognized format, {len(raw)} bytes)")


def _describe_load_error(e: BaseException) -> str:
    """One line about why torch.load failed, without torch's advice to load unsafely."""
    text = str(e)
    m = re.search(r"(?:unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text, re.IGNORECASE)
    if m:
        return f"it holds a Python object ({m.group(1)}) that a weights-only load refuses to build"
    if isinstance(e, pickle.UnpicklingError):
        return "its contents are not a weights-only pickle"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln), "")
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `pni_fast.train.train` (a file, or a folder holding checkpoint.pt).

    Raises FileNotFoundError when it is missing and `CheckpointError` (a
    ValueError) with a one-line reason when it is empty, truncated, corrupted
    (checksum mismatch) or not a pni_fast checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    with open(path, "rb") as f:
        raw = f.read()
    payload = _payload(path, raw)
    try:
        ckpt = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {_describe_load_error(e)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path!r} is not a pni_fast training checkpoint (keys 'model' and 'epoch' missing)")
    if payload is raw:
        warnings.warn(
            f"checkpoint {path!r} has no checksum (written by an older pni_fast); its integrity cannot be verified",
            stacklevel=2,
        )
    return ckpt


# --- the files of a training run (used by pni_fast.train) ---

RUN_FILES = (CHECKPOINT_NAME, "history.json", "metrics.csv")  # what a run writes into out_dir


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    st["numpy"] = (
        np_state[0],
        torch.from_numpy(np_state[1].copy()),
        int(np_state[2]),
        int(np_state[3]),
        float(np_state[4]),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "python" in st:
        py = st["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in st:
        name, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def write_logs(out_dir: str, history: list[dict[str, Any]]) -> None:
    atomic_write_bytes(os.path.join(out_dir, "history.json"), json.dumps(history, indent=1).encode())
    cols = [
        "epoch",
        "lr",
        "adversarial",
        "train_loss",
        "train_clean_acc",
        "train_adv_acc",
        "test_clean_acc",
        "test_adv_acc",
        "alpha_mean",
        "time_s",
    ]
    alpha_names = sorted({k for h in history for k in h.get("alpha", {})})
    s = io.StringIO()
    w = csv.writer(s)
    w.writerow(cols + [f"alpha[{n}]" for n in alpha_names])
    for h in history:
        w.writerow(
            [h.get(c, "") if h.get(c) is not None else "" for c in cols] + [h["alpha"].get(n, "") for n in alpha_names]
        )
    atomic_write_bytes(os.path.join(out_dir, "metrics.csv"), s.getvalue().encode())


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def prepare_out_dir(out_dir: str, resume: Optional[str], overwrite: bool, started: float) -> None:
    """Make out_dir, drop orphan temp files, refuse to mix with another run unless overwrite."""
    os.makedirs(out_dir, exist_ok=True)
    remove_orphan_temp_files(out_dir, RUN_FILES, started)
    existing = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
    if not existing:
        return
    ckpt = os.path.join(out_dir, CHECKPOINT_NAME)
    resume_file = None
    if resume is not None:
        resume_file = os.path.join(resume, CHECKPOINT_NAME) if os.path.isdir(resume) else resume
    if resume_file is not None and _same_file(resume_file, ckpt):
        return  # continuing the run in place
    if not overwrite:
        raise FileExistsError(
            f"output folder {out_dir!r} already holds a training run ({', '.join(existing)}); continue it with "
            f"--resume {out_dir} (resume=...) or replace it with --overwrite (overwrite=True)"
        )
    for n in existing:
        os.remove(os.path.join(out_dir, n))
