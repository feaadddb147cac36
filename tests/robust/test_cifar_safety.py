"""CIFAR-10 batches are read without running code from the file, and checked at load time."""

from __future__ import annotations

import os
import pickle
import shlex

import numpy as np
import pytest

from pni_fast.robust.data import CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES, load_cifar10, safe_load_pickle


class _Touch:
    """Unpickling this runs a shell command that creates ``path`` (a classic pickle payload)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


class _Open:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _batch(n=4, seed=0, labels=None, data=None):
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
        b"labels": [int(v) for v in rng.integers(0, 10, n)] if labels is None else labels,
        b"batch_label": b"fake",
    }


def _write_all(folder, override=None, protocol=pickle.DEFAULT_PROTOCOL):
    for i, name in enumerate(CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)):
        obj = (override or {}).get(name, _batch(seed=i))
        with open(folder / name, "wb") as f:
            if isinstance(obj, bytes):
                f.write(obj)
            else:
                pickle.dump(obj, f, protocol=protocol)


@pytest.mark.parametrize("payload_cls", [_Touch, _Open])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_crafted_payload_is_refused_and_not_executed(tmp_path, payload_cls, where):
    # the payload is real: plain pickle.load runs it
    control = tmp_path / "control_side_effect"
    pickle.loads(pickle.dumps(payload_cls(str(control))))
    assert control.exists(), "test payload does not work; the test would prove nothing"

    side = tmp_path / "side_effect"
    evil = payload_cls(str(side))
    obj = evil if where == "top" else {**_batch(), b"batch_label": [1, {"x": evil}]}
    data_dir = tmp_path / "cifar"
    data_dir.mkdir()
    _write_all(data_dir, {"data_batch_3": obj})
    with pytest.raises(ValueError) as e:
        load_cifar10(data_dir)
    msg = str(e.value)
    assert "data_batch_3" in msg and "refused" in msg
    expected_global = "posix.system" if payload_cls is _Touch else "io.open"
    assert expected_global in msg, msg
    assert not side.exists(), "the payload ran"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_every_pickle_protocol_of_a_real_batch_loads(tmp_path, protocol):
    _write_all(tmp_path, protocol=protocol)
    tr, te = load_cifar10(tmp_path)
    assert tr.x.shape == (20, 3, 32, 32) and te.x.shape == (4, 3, 32, 32)
    with open(tmp_path / "test_batch", "rb") as f:
        ref = pickle.load(f, encoding="bytes")
    assert np.array_equal(te.x.numpy(), ref[b"data"].reshape(4, 3, 32, 32))
    assert te.y.tolist() == ref[b"labels"]


def test_numpy1_global_names_and_4d_data_and_label_arrays(tmp_path):
    # numpy 1 wrote numpy.core.multiarray._reconstruct (the real CIFAR files' name)
    b = _batch(n=3, seed=5)
    b[b"data"] = b[b"data"].reshape(3, 3, 32, 32)
    b[b"labels"] = np.array([0, 9, 4], dtype=np.int32)
    raw = pickle.dumps(b, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    path = tmp_path / "batch"
    path.write_bytes(raw)
    d = safe_load_pickle(path)
    assert np.array_equal(d[b"data"], b[b"data"]) and d[b"labels"].tolist() == [0, 9, 4]
    _write_all(tmp_path, {"test_batch": raw})
    _, te = load_cifar10(tmp_path)
    assert te.y.tolist() == [0, 9, 4] and np.array_equal(te.x.numpy(), b[b"data"])


def test_codecs_encode_only_latin1(tmp_path):
    raw = pickle.dumps(b"abc", protocol=2)
    assert b"_codecs\nencode" in raw and b"latin1" in raw
    p = tmp_path / "b"
    p.write_bytes(raw)
    assert safe_load_pickle(p) == b"abc"
    p.write_bytes(raw.replace(b"latin1", b"utf_16"))  # same length: the opcode holds it
    with pytest.raises(ValueError, match="refused _codecs.encode"):
        safe_load_pickle(p)


@pytest.mark.parametrize(
    "override,needle",
    [
        (dict(labels=[0, 1, 10, 2]), r"labels must lie in \[0, 10\), got 10 at index 2"),
        (dict(labels=[0, -1, 3, 2]), r"got -1 at index 1"),
        (dict(labels=[0, 1, 2]), "4 images and 3 labels"),
        (dict(labels=[0, 1.0, 2, 3]), "must hold integers, got float"),
        (dict(labels=[0, True, 2, 3]), "must hold integers, got bool"),
        (dict(labels=np.array([0, 11, 2, 3])), "got 11 at index 1"),
        (dict(labels=np.zeros(4)), "1-D integer array"),
        (dict(labels=b"0123"), "list of integers"),
        (dict(data=np.zeros((4, 3072), np.int64)), "uint8 numpy array, got array of dtype int64"),
        (dict(data=[[0] * 3072] * 4), "uint8 numpy array, got list"),
        (dict(data=np.zeros((4, 3, 32, 31), np.uint8)), r"\[N, 3072\] or \[N, 3, 32, 32\], got \[4, 3, 32, 31\]"),
    ],
)
def test_bad_batches_are_refused_at_load(tmp_path, override, needle):
    b = _batch()
    for k, v in override.items():
        b[k.encode()] = v
    _write_all(tmp_path, {"data_batch_5": b})
    with pytest.raises(ValueError, match=needle) as e:
        load_cifar10(tmp_path)
    assert "data_batch_5" in str(e.value)
