"""Embedded digits, CIFAR-10 pickle loading (with fake batches), augmentation and batching."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pni_fast.robust.data import (
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    Split,
    iterate_batches,
    load_cifar10,
    load_digits,
    random_crop_flip,
    to_unit_float,
)


def test_digits_shapes_range_and_fixed_stratified_split():
    tr, te = load_digits()
    assert len(tr) + len(te) == 1797 and len(te) == 360
    assert tr.x.shape[1:] == (1, 8, 8) and tr.x.dtype == torch.float32
    assert tr.x.min() >= 0 and tr.x.max() <= 1 and tr.x.max() == 1
    assert tr.y.dtype == torch.int64 and tr.num_classes == 10
    counts = torch.bincount(te.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 10% of ~180 per class
    tr2, te2 = load_digits()
    assert torch.equal(te.x, te2.x) and torch.equal(tr.y, tr2.y)
    _, te3 = load_digits(seed=1)
    assert not torch.equal(te.x, te3.x)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def _write_fake_cifar(folder, n_per_batch=4, skip=(), str_keys=False):
    rng = np.random.default_rng(0)
    expected = {}
    for i, name in enumerate(CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)):
        if name in skip:
            continue
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n_per_batch)]
        d = {"data": data, "labels": labels} if str_keys else {b"data": data, b"labels": labels, b"batch_label": b"x"}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        expected[name] = (data, labels)
    return expected


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_from_fake_pickles(tmp_path, str_keys):
    expected = _write_fake_cifar(tmp_path, str_keys=str_keys)
    tr, te = load_cifar10(tmp_path)
    assert tr.x.shape == (20, 3, 32, 32) and te.x.shape == (4, 3, 32, 32)
    assert tr.x.dtype == torch.uint8 and tr.y.dtype == torch.int64
    d3, l3 = expected["data_batch_3"]
    # row-major 3072 = 3 channels x 32 x 32 (R plane first)
    assert torch.equal(tr.x[8:12], torch.from_numpy(d3.reshape(4, 3, 32, 32)))
    assert tr.y[8:12].tolist() == l3
    assert te.y.tolist() == expected["test_batch"][1]
    xb, yb = next(iterate_batches(te, 2))
    assert xb.dtype == torch.float32 and xb.max() <= 1
    torch.testing.assert_close(xb, te.x[:2].float() / 255)


def test_cifar10_missing_files_are_named(tmp_path):
    _write_fake_cifar(tmp_path, skip=("data_batch_4", "test_batch"))
    with pytest.raises(FileNotFoundError, match="data_batch_4, test_batch"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")


def test_cifar10_bad_file(tmp_path):
    _write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_2"):
        load_cifar10(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(tmp_path)


def test_random_crop_flip_is_a_shifted_window_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).view(2, 3, 6, 5) + 1  # no zeros inside the image
    out = random_crop_flip(x.repeat(50, 1, 1, 1), padding=2, generator=g)
    assert out.shape == (100, 3, 6, 5)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(100):
        src = xp[i % 2]
        match = None
        for dy in range(5):
            for dx in range(5):
                win = src[:, dy : dy + 6, dx : dx + 5]
                if torch.equal(out[i], win):
                    match = (dy, dx, 0)
                elif torch.equal(out[i], win.flip(2)):
                    match = (dy, dx, 1)
        assert match is not None, f"image {i} is not a crop of the padded input"
        seen.add(match)
    assert len(seen) > 20  # offsets and flips vary
    assert any(m[2] for m in seen) and any(not m[2] for m in seen)
    # same generator seed -> same augmentation
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(x, padding=-1)


def test_iterate_batches_covers_every_example_once():
    s = Split(torch.rand(10, 1, 2, 2), torch.arange(10))
    seen = torch.cat([y for _, y in iterate_batches(s, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert sum(1 for _ in iterate_batches(s, 3, drop_last=True)) == 3
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(s, 0))
    with pytest.raises(TypeError, match="uint8"):
        to_unit_float(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        Split(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
