"""Checkpoints: checksum, damaged files as one-line errors, orphan temp files, log order, resume and Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import pni_fast.robust.epoch as epoch_mod
from pni_fast.cli import main
from pni_fast.models import DigitsCNN
from pni_fast.robust.checkpoint import MAGIC, CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from pni_fast.robust.data import load_digits
from pni_fast.robust.train import TrainConfig, train

from repo import ROOT


@pytest.fixture(scope="module")
def digits():
    tr, te = load_digits()
    return tr.subset(64), te.subset(16)


def _cfg(**kw):
    base = dict(
        epochs=1,
        batch_size=32,
        warmup_epochs=0,
        adv_eps=0.1,
        adv_alpha=0.05,
        adv_steps=1,
        eval_samples=16,
        eval_pgd_steps=1,
        lr=0.05,
    )
    base.update(kw)
    return TrainConfig(**base)


def _state():
    torch.manual_seed(0)
    m = DigitsCNN(1, 10, 4)
    return {"model": m.state_dict(), "epoch": 3, "history": [{"epoch": 1}]}


def _one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"python -m pni_fast {argv[0]}: error: "), err
    assert "weights_only" not in err and "Traceback" not in err
    return err


def test_roundtrip_and_format(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, _state())
    raw = p.read_bytes()
    assert raw.startswith(MAGIC)
    ck = load_checkpoint(p)
    assert ck["epoch"] == 3
    for k, v in _state()["model"].items():
        assert torch.equal(ck["model"][k], v), k
    assert os.listdir(tmp_path) == ["c.pt"]


def test_bit_flip_in_a_weight_is_detected(tmp_path):
    p = tmp_path / "c.pt"
    state = _state()
    save_checkpoint(p, state)
    raw = bytearray(p.read_bytes())
    w = state["model"]["features.0.weight"].numpy().tobytes()
    at = bytes(raw).find(w)
    assert at > 0
    raw[at + 5] ^= 0x10
    p.write_bytes(bytes(raw))
    # without the checksum the flip would load silently as a different weight
    payload = bytes(raw).split(b"\n", 2)[2]
    silent = torch.load(io.BytesIO(payload), weights_only=True)["model"]["features.0.weight"]
    assert not torch.equal(silent, state["model"]["features.0.weight"])
    with pytest.raises(CheckpointError, match="corrupted: sha256"):
        load_checkpoint(p)


def _damaged(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _state())
    raw = good.read_bytes()
    legacy = io.BytesIO()
    torch.save(_state(), legacy)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hi",))

    legacy_evil = io.BytesIO()
    torch.save({"model": {}, "epoch": 1, "x": Evil()}, legacy_evil)
    cases = {
        "truncated": (raw[: len(raw) // 2], "truncated"),
        "empty": (b"", "empty"),
        "random": (
            np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "not a pni_fast checkpoint",
        ),
        "header": (MAGIC + b"sha256 xyz\n" + raw[200:], "damaged header"),
        "too-long": (raw + b"\0", "too long"),
        "legacy-truncated": (legacy.getvalue()[:3000], "cannot read checkpoint"),
        "legacy-evil": (legacy_evil.getvalue(), "posix.system"),
    }
    out = {}
    for name, (data, needle) in cases.items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(data)
        out[name] = (p, needle)
    return out


def test_damaged_checkpoints_are_clear_errors(tmp_path):
    for name, (p, needle) in _damaged(tmp_path).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy files warn about the missing checksum
            with pytest.raises(CheckpointError) as e:
                load_checkpoint(p)
        msg = str(e.value)
        assert needle in msg and str(p) in msg and "\n" not in msg and "weights_only" not in msg, (name, msg)


def test_damaged_checkpoints_give_one_line_cli_errors(tmp_path, capsys):
    for name, (p, needle) in _damaged(tmp_path).items():
        assert needle in _one_line_error(capsys, ["eval", "--checkpoint", str(p)]), name
        err = _one_line_error(capsys, ["train", "--resume", str(p), "--out", str(tmp_path / "o"), "--no-progress"])
        assert needle in err, name


def test_damaged_checkpoint_in_a_subprocess_has_no_traceback(tmp_path):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "pni_fast", "eval", "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"python -m pni_fast eval: error: checkpoint {str(p)!r} is empty (0 bytes): the run that wrote it was cut off"
    ]


def test_legacy_checkpoint_loads_with_a_warning(tmp_path):
    p = tmp_path / "old.pt"
    torch.save(_state(), p)
    with pytest.warns(UserWarning, match="no checksum"):
        assert load_checkpoint(p)["epoch"] == 3


def test_interrupted_atomic_write_leaves_no_temp_and_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f"
    atomic_write_bytes(str(p), b"old")

    def stop(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stop)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(str(p), b"new")
    assert os.listdir(tmp_path) == ["f"] and p.read_bytes() == b"old"


def test_orphan_temp_files_are_removed_at_start(digits, tmp_path):
    tr, _ = digits
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()
    names = {
        f"checkpoint.pt.tmp{dead.pid}": False,  # writer gone -> removed
        f"history.json.tmp{os.getpid()}": False,  # our own pid: no write in flight -> removed
        f"metrics.csv.tmp{alive}": False,  # live pid but written long before the run -> removed
        f"checkpoint.pt.tmp{alive}": True,  # live pid, just written: another run's write in flight -> kept
        "checkpoint.pt.tmpx": True,  # not ours
        "notes.txt": True,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    old = time.time() - 3600
    os.utime(tmp_path / f"metrics.csv.tmp{alive}", (old, old))
    train(DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False), out_dir=tmp_path, progress=False)
    left = set(os.listdir(tmp_path))
    for n, kept in names.items():
        assert (n in left) == kept, n
    assert {"checkpoint.pt", "history.json", "metrics.csv"} <= left


def test_logs_are_written_after_the_checkpoint(digits, tmp_path, monkeypatch):
    tr, _ = digits

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(epoch_mod, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space"):
        train(DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False), out_dir=tmp_path, progress=False)
    assert os.listdir(tmp_path) == [], "logs ran ahead of the checkpoint"


def test_resume_truncates_logs_that_ran_ahead(digits, tmp_path, monkeypatch):
    tr, te = digits
    full = tmp_path / "full"
    snap = tmp_path / "snap.pt"

    def keep_first(rec):
        if rec["epoch"] == 1:
            shutil.copy(full / "checkpoint.pt", snap)

    train(DigitsCNN(1, 10, 4), tr, te, _cfg(epochs=2), out_dir=full, progress=False, on_epoch=keep_first)
    # a crash left logs of epoch 2 next to the checkpoint of epoch 1 (what older versions could do)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(snap, run / "checkpoint.pt")
    for n in ("history.json", "metrics.csv"):
        shutil.copy(full / n, run / n)
    assert len(json.loads((run / "history.json").read_text())) == 2

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(epoch_mod, "evaluate_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(DigitsCNN(1, 10, 4), tr, te, _cfg(epochs=2), out_dir=run, resume=run, progress=False)
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]
    assert (run / "metrics.csv").read_text().count("\n") == 2  # header + epoch 1


def test_resume_of_a_finished_run(digits, tmp_path, capsys):
    tr, _ = digits
    hist = train(DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False), out_dir=tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.warns(UserWarning, match="already holds 1 epochs"):
        again = train(
            DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False), out_dir=tmp_path, resume=tmp_path, progress=False
        )
    assert [h["epoch"] for h in again] == [h["epoch"] for h in hist]
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    # the CLI: a note and exit status 0
    out = tmp_path / "cli"
    common = ["train", "--limit-train", "64", "--eval-samples", "8", "--no-adv", "--out", str(out), "--no-progress"]
    assert main([*common, "--epochs", "1"]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*common, "--epochs", "1", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "nothing to train" in err and "already holds 1 epochs (--epochs 1)" in err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_existing_run_needs_resume_or_overwrite(digits, tmp_path, capsys):
    tr, _ = digits
    train(DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False, epochs=2), out_dir=tmp_path / "a", progress=False)
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False), out_dir=tmp_path / "a", progress=False)
    # resuming some other checkpoint into it is refused too
    train(DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False), out_dir=tmp_path / "b", progress=False)
    with pytest.raises(FileExistsError, match="already holds"):
        train(
            DigitsCNN(1, 10, 4),
            tr,
            None,
            _cfg(adversarial=False, epochs=2),
            out_dir=tmp_path / "a",
            resume=tmp_path / "b",
            progress=False,
        )
    hist = train(
        DigitsCNN(1, 10, 4), tr, None, _cfg(adversarial=False), out_dir=tmp_path / "a", progress=False, overwrite=True
    )
    assert len(hist) == 1 and load_checkpoint(tmp_path / "a")["epoch"] == 1
    assert len(json.loads((tmp_path / "a" / "history.json").read_text())) == 1
    # the CLI says how to go on
    common = [
        "train",
        "--limit-train",
        "64",
        "--eval-samples",
        "8",
        "--no-adv",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "a"),
        "--no-progress",
    ]
    err = _one_line_error(capsys, common)
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert main([*common, "--overwrite"]) == 0


def test_ctrl_c_names_the_checkpoint_and_the_exact_resume_command(tmp_path, capsys, monkeypatch):
    common = [
        "train",
        "--limit-train",
        "64",
        "--eval-samples",
        "8",
        "--pgd-steps",
        "1",
        "--batch-size",
        "32",
        "--pni",
        "layerwise",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    capsys.readouterr()  # the reference run's progress lines

    def message(err: str) -> str:
        """stderr without the per-epoch progress lines: what the interruption itself printed."""
        return "".join(line for line in err.splitlines(True) if not line.startswith("[train] epoch "))

    real = epoch_mod.evaluate_epoch
    calls = {"n": 0}

    def interrupt_in(epoch):
        def ev(*a, **k):
            calls["n"] += 1
            if calls["n"] == epoch:
                raise KeyboardInterrupt
            return real(*a, **k)

        return ev

    out = tmp_path / "run dir"  # a space: the command must quote it
    monkeypatch.setattr(epoch_mod, "evaluate_epoch", interrupt_in(1))
    with pytest.raises(SystemExit) as e:
        main([*common, "--out", str(out)])
    assert e.value.code == 130
    err = message(capsys.readouterr().err)
    assert err.count("\n") == 1 and "before a checkpoint was written" in err and "--resume" not in err

    calls["n"] = 0
    monkeypatch.setattr(epoch_mod, "evaluate_epoch", interrupt_in(2))
    with pytest.raises(SystemExit) as e:
        main([*common, "--out", str(out), "--overwrite"])
    assert e.value.code == 130
    full = capsys.readouterr().err
    assert "[train] epoch 1/2: " in full, "the finished epoch's progress line"
    err = message(full)
    ckpt = str(out / "checkpoint.pt")
    assert err.count("\n") == 1 and f"last checkpoint {ckpt} (epoch 1 of 2)" in err, err
    cmd = shlex.split(err.split("resume with: ", 1)[1])
    assert cmd[1:3] == ["-m", "pni_fast"] and cmd[-2:] == ["--resume", ckpt] and "--overwrite" not in cmd
    monkeypatch.setattr(epoch_mod, "evaluate_epoch", real)
    assert main(cmd[3:]) == 0
    hist = json.loads((out / "history.json").read_text())
    strip = lambda hs: [{k: v for k, v in h.items() if k != "time_s"} for h in hs]  # noqa: E731
    assert strip(hist) == strip(ref), "the resumed run differs from an uninterrupted one"


def test_resume_with_another_noise_kind_is_a_one_line_error(tmp_path, capsys):
    """--noise both adds alpha_i parameters: resuming a weight-noise run with it is the same one-line
    error as a --pni/--model mismatch, not load_state_dict's traceback (and back)."""
    out = str(tmp_path / "run")
    common = ["train", "--limit-train", "64", "--eval-samples", "8", "--no-adv", "--no-progress", "--out", out]
    assert main([*common, "--epochs", "1", "--pni", "layerwise"]) == 0
    capsys.readouterr()
    resume = [*common, "--epochs", "2", "--resume", out]
    err = _one_line_error(capsys, [*resume, "--pni", "layerwise", "--noise", "both"])
    assert "holds digits_cnn pni=layerwise noise=weight, but --model digits_cnn --pni layerwise --noise both" in err
    err = _one_line_error(capsys, [*resume, "--pni", "channelwise"])
    assert "holds digits_cnn pni=layerwise noise=weight, but --model digits_cnn --pni channelwise" in err
    assert main([*common, "--epochs", "1", "--pni", "layerwise", "--noise", "both", "--overwrite"]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, [*resume, "--pni", "layerwise", "--noise", "weight"])
    assert "pni=layerwise noise=both, but --model digits_cnn --pni layerwise --noise weight" in err
    assert main([*resume, "--pni", "layerwise", "--noise", "both"]) == 0  # the matching flags resume
