"""The robust toolkit apart from the core: ``import pni_fast`` loads no toolkit module, lazy public
names and the pre-0.2 module paths are the toolkit's, one mode helper and one check module, and a
missing optional dependency names the extra that installs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pni_fast.robust import attacks
from pni_fast.robust.attacks import fgsm, pgd
from pni_fast.robust.evaluate import AttackSpec

from repo import ROOT


def test_import_pni_fast_loads_only_the_core():
    """``import pni_fast`` must not load pni_fast.robust nor the toolkit's optional dependencies
    (beyond what ``import torch`` itself loads: torch.hub imports tqdm when it is installed)."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import pni_fast\n"
        "bad = sorted(k for k in set(sys.modules) - before if k.startswith('pni_fast.robust') or k.split('.')[0] in "
        "('tqdm', 'sklearn', 'matplotlib', 'torchattacks'))\n"
        "print('LOADED', bad)\n"
        "pni_fast.pgd\n"
        "print('AFTER', 'pni_fast.robust.attacks' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LOADED []" in r.stdout and "AFTER True" in r.stdout, r.stdout


def test_public_names_are_the_toolkit():
    import importlib

    import pni_fast
    import pni_fast.robust as robust

    assert pni_fast.pgd is robust.attacks.pgd and pni_fast.fgsm is robust.attacks.fgsm
    assert pni_fast.autoattack_rand is robust.interop.autoattack_rand
    assert pni_fast.AttackSpec is robust.evaluate.AttackSpec and pni_fast.TrainConfig is robust.train.TrainConfig
    assert pni_fast.train.train is robust.train.train and pni_fast.evaluate.evaluate is robust.evaluate.evaluate
    for name in ("attacks", "evaluate", "train", "data"):  # the lazy names are the toolkit's modules
        assert getattr(pni_fast, name) is importlib.import_module(f"pni_fast.robust.{name}")
    assert set(pni_fast.__all__) <= set(dir(pni_fast))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pni_fast.nope  # noqa: B018


def test_one_mode_helper_and_one_check_module():
    from pni_fast.robust import checks, epoch, evaluate, modes

    assert modes.model_mode is evaluate.model_mode is epoch.model_mode
    assert attacks.attack_mode is modes.attack_mode
    # a wrong type is a TypeError that `except ValueError` (what TrainConfig and evaluate raised) also catches
    assert issubclass(checks.WrongTypeError, TypeError) and issubclass(checks.WrongTypeError, ValueError)
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match="steps must be an int >= 1"):
            pgd(torch.nn.Linear(2, 2), torch.rand(1, 2), torch.zeros(1, dtype=torch.long), steps=bad)
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            checks.check_int("steps", bad, 1)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1"):
        fgsm(torch.nn.Linear(2, 2), torch.rand(1, 2), torch.zeros(1, dtype=torch.long), eps=-1)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got nan"):
        checks.check_real("eps", float("nan"))
    with pytest.raises(ValueError, match=r"p_init must be a finite number in \(0, 1\]"):
        checks.check_real("p_init", 1.5, positive=True, maximum=1)
    with pytest.raises(ValueError, match=r"norm must be one of \('linf', 'l2'\), got 'l1'"):
        AttackSpec("pgd", norm="l1")
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\], got 2"):
        checks.check_int("rank", 2, 0, 1)
    assert checks.check_int("n", 3, 1) == 3 and checks.check_real("x", 1) == 1.0


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    from pni_fast.robust import data

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import -> ImportError
    with pytest.raises(ImportError, match=r"scikit-learn.*pip install 'pni_fast\[robust\]'"):
        data.load_digits()
