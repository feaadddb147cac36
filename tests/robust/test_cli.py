"""`python -m pni_fast`: the demo end-to-end at a tiny size, train/eval/resume, help and argument errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from pni_fast.cli import build_parser, main

from repo import ROOT


def _run(*args, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "pni_fast", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = _run("demo", "--quick", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("plain", "PGD-AT", "PGD-AT + PNI-W (layerwise)"):
        assert row in r.stdout
    assert "clean" in r.stdout and "EOT-PGD-2x2" in r.stdout and "+/-" in r.stdout
    assert "random start=yes" in r.stdout and "EOT samples=2" in r.stdout
    png = out / "pni_demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"plain", "PGD-AT", "PGD-AT + PNI-W (layerwise)"}
    plain = res["models"]["plain"]
    assert all(r_["std"] == 0.0 for r_ in plain), "a deterministic model must have std 0"
    assert res["history"]["PGD-AT + PNI-W (layerwise)"][-1]["alpha"], "alphas must be logged"
    assert (out / "pgdat_pniw" / "checkpoint.pt").is_file()
    # stderr is a pipe here (no bars): one progress line per epoch and per attack, with elapsed time and ETA
    assert re.search(r"\[demo PGD-AT\] epoch 1/\d+: loss [0-9.]+, test [0-9.]+%.*elapsed, ETA \d+ s", r.stderr)
    assert re.search(r"\[demo plain\] PGD-2: [0-9.]+% \(2/\d+ attacks, \d+ s elapsed, ETA \d+ s\)", r.stderr)
    cols = [r_["attack"] for r_ in plain]
    if importlib.util.find_spec("torchattacks") is not None:  # AutoAttack-rand and Square at --quick's sizes
        assert cols == ["clean", "PGD-2", "EOT-PGD-2x2", "AA-rand-2x2", "Square-10", "EOT-Square-10x2"]
        assert "APGD-CE, then APGD-DLR" in r.stdout and "queries=10" in r.stdout
    else:
        assert cols == ["clean", "PGD-2", "EOT-PGD-2x2"] and "torchattacks is not installed" in r.stderr


def test_demo_without_torchattacks_columns(tmp_path, capsys):
    """--no-torchattacks: the three gradient columns only, and no note about torchattacks."""
    from pni_fast.robust.cli_demo import run_demo

    args = build_parser().parse_args(
        ["demo", "--quick", "--no-torchattacks", "--no-plot", "--no-progress", "--out", str(tmp_path / "d")]
    )
    assert args.aa_steps == 10 and args.aa_eot_samples == 4 and args.square_queries == 200  # the demo's defaults
    res = run_demo(args)
    assert [r_["attack"] for r_ in res["models"]["plain"]] == ["clean", "PGD-2", "EOT-PGD-2x2"]
    assert "torchattacks" not in capsys.readouterr().err


def test_train_eval_resume_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    common = [
        "--limit-train",
        "128",
        "--eval-samples",
        "32",
        "--pgd-steps",
        "2",
        "--batch-size",
        "64",
        "--pni",
        "layerwise",
        "--out",
        str(out),
        "--no-progress",
        "--eps",
        "8/255",
    ]
    assert main(["train", "--epochs", "2", "--warmup-epochs", "1", *common]) == 0
    assert "checkpoint and logs in" in capsys.readouterr().out
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 2
    # continue the same run to 3 epochs
    assert (
        main(["train", "--epochs", "3", "--warmup-epochs", "1", *common, "--resume", str(out / "checkpoint.pt")]) == 0
    )
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    text = capsys.readouterr().out
    assert "after epoch 2 of 3" in text and "epoch 3:" in text  # says where it resumes, one line per epoch
    js = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out),
                "--limit",
                "32",
                "--pgd-steps",
                "2",
                "--eot-samples",
                "2",
                "--repeats",
                "2",
                "--attacks",
                "clean,fgsm,pgd,eot-pgd",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "digits_cnn + PNI (layerwise, weight)" in text and "EOT-PGD-2x2" in text and "eps=8/255" in text
    data = json.loads(js.read_text())
    assert [r["attack"] for r in data["results"]] == ["clean", "FGSM", "PGD-2", "EOT-PGD-2x2"]
    assert data["results"][2]["settings"]["eps"] == pytest.approx(8 / 255)
    # switching the noise off makes the model deterministic -> std 0
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out),
                "--limit",
                "32",
                "--attacks",
                "clean",
                "--repeats",
                "3",
                "--no-noise",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    assert json.loads(js.read_text())["results"][0]["std"] == 0.0
    if importlib.util.find_spec("torchattacks") is not None:  # AutoAttack-rand and Square through torchattacks
        assert (
            main(
                [
                    "eval",
                    "--checkpoint",
                    str(out),
                    "--limit",
                    "16",
                    "--attacks",
                    "clean,autoattack-rand,square",
                    "--aa-steps",
                    "2",
                    "--aa-eot-samples",
                    "2",
                    "--square-queries",
                    "10",
                    "--repeats",
                    "2",
                    "--json",
                    str(js),
                ]
            )
            == 0
        )
        assert [r["attack"] for r in json.loads(js.read_text())["results"]] == ["clean", "AA-rand-2x2", "Square-10"]


@pytest.mark.parametrize("cmd", [[], ["demo"], ["train"], ["eval"], ["info"], ["bench"]])
def test_help(cmd, capsys):
    if cmd == ["bench"]:  # passed on to benchmarks/run_all.py, whose options it shows
        assert main(["bench", "--help"]) == 0
        out = capsys.readouterr().out
        assert "usage: run_all.py" in out and "--quick" in out and "--threads" in out
        return
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    assert "%%" not in out and "(default: None)" not in out
    assert out.count("(default:") <= out.count("--") and "default: 160" in out if cmd == ["train"] else True
    if cmd == ["train"]:
        for opt in (
            "--model",
            "--pni",
            "--noise",
            "--data-dir",
            "--epochs",
            "--out",
            "--resume",
            "--overwrite",
            "--eps",
        ):
            assert opt in out
    if cmd == []:
        for sub in ("demo", "train", "eval", "info", "bench"):
            assert sub in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["demo", "--epochs", "0"], "--epochs"),
        (["demo", "--eps", "abc"], "8/255"),
        (["demo", "--pni", "kernelwise"], "invalid choice"),
        (["demo", "--aa-eot-samples", "1"], "an integer >= 2"),
        (["demo", "--square-queries", "0"], "--square-queries"),
        (["train", "--model", "resnet99"], "invalid choice"),
        (["train", "--lr", "-1"], "--lr"),
        (["eval"], "--checkpoint"),
        (["frobnicate"], "invalid choice"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "required"),
    ],
)
def test_bad_arguments_are_argparse_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_semantic_errors_exit_2_with_message(tmp_path, capsys):
    cases = [
        (["train", "--model", "resnet20", "--dataset", "digits"], "CIFAR ResNet"),
        (
            ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
            "does not exist",
        ),
        (["eval", "--checkpoint", str(tmp_path / "missing.pt")], "not found"),
        (["eval", "--checkpoint", str(tmp_path), "--attacks", "clean"], "not found"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert needle in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "d"), "--epochs", "3", "--warmup-epochs", "3"])
    assert "--warmup-epochs" in capsys.readouterr().err


def test_eps_accepts_fractions():
    args = build_parser().parse_args(["train", "--eps", "8/255", "--step", "2/255"])
    assert args.eps == pytest.approx(8 / 255) and args.step == pytest.approx(2 / 255)


def test_bench_missing_script_explains(monkeypatch, tmp_path, capsys):
    import pni_fast.cli as cli

    monkeypatch.setattr(cli, "_bench_script", lambda: str(tmp_path / "benchmarks" / "run_all.py"))
    assert main(["bench"]) == 1
    err = capsys.readouterr().err
    assert "run_all.py not found" in err and "checkout" in err


def test_bench_runs_the_script_with_its_arguments(monkeypatch, tmp_path, capsys):
    import pni_fast.cli as cli

    script = tmp_path / "run_all.py"
    script.write_text("import sys\nprint('BENCH', sys.argv[1:])\nsys.exit(3 if '--fail' in sys.argv else 0)\n")
    monkeypatch.setattr(cli, "_bench_script", lambda: str(script))
    assert main(["bench", "--quick", "--sizes", "1"]) == 0
    assert "BENCH ['--quick', '--sizes', '1']" in capsys.readouterr().out
    assert main(["bench", "--fail"]) == 3


def test_train_resnet20_pni_on_fake_cifar(tmp_path, capsys):
    """The CIFAR path end to end: pickles -> ResNet-20 with channelwise PNI -> checkpoint -> eval."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    data_dir = tmp_path / "cifar-10-batches-py"
    data_dir.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(data_dir / name, "wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                    b"labels": [int(v) for v in rng.integers(0, 10, 4)],
                },
                f,
            )
    out = tmp_path / "rn"
    assert (
        main(
            [
                "train",
                "--model",
                "resnet20",
                "--pni",
                "channelwise",
                "--data-dir",
                str(data_dir),
                "--epochs",
                "1",
                "--warmup-epochs",
                "0",
                "--pgd-steps",
                "1",
                "--batch-size",
                "10",
                "--eval-samples",
                "4",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    hist = json.loads((out / "history.json").read_text())
    assert hist[0]["adversarial"] and len(hist[0]["alpha"]) == 20  # 19 convs + classifier
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out),
                "--data-dir",
                str(data_dir),
                "--attacks",
                "clean,pgd",
                "--pgd-steps",
                "1",
                "--repeats",
                "2",
            ]
        )
        == 0
    )
    assert "resnet20 + PNI (channelwise, weight)" in capsys.readouterr().out


_TOOLKIT_DEPS = ("numpy", "sklearn", "matplotlib", "tqdm", "scipy", "torchattacks")
_CORE_ONLY = (
    "import runpy, sys\n"
    f"for m in {_TOOLKIT_DEPS!r}:\n"
    "    sys.modules[m] = None  # unimportable, as in a core-only install\n"
    "sys.argv = ['pni_fast'] + sys.argv[1:]\n"
    "runpy.run_module('pni_fast', run_name='__main__', alter_sys=True)\n"
)


def _core_only(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _CORE_ONLY, *args], capture_output=True, text=True, timeout=300
    )


def test_core_only_install_runs_info_and_names_the_extra_for_the_toolkit():
    """Without the robust extra's packages: `info` works, a toolkit command exits 2 with one line naming the
    install, and the lazy toolkit names raise an ImportError that names it too."""
    info = _core_only("info")
    assert info.returncode == 0, info.stderr
    assert "pni_fast backends" in info.stdout
    demo = _core_only("demo", "--quick")
    assert demo.returncode == 2
    lines = [line for line in demo.stderr.splitlines() if "pni_fast" in line]
    assert len(lines) == 1 and "pip install 'pni_fast[robust]'" in lines[0], demo.stderr
    code = f"import sys\nfor m in {_TOOLKIT_DEPS!r}: sys.modules[m] = None\nimport pni_fast\n"
    code += "try:\n    pni_fast.pgd\nexcept ImportError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert "pni_fast.pgd is part of the robustness toolkit" in out.stdout and "pni_fast[robust]" in out.stdout
