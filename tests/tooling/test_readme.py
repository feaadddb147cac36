"""The README's example and commands stay true."""

import os
import re

from repo import ROOT


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_example_runs():
    section = _readme().split("## Ten lines of use", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["clean_logits"].shape == (128, 10)
    assert all(p.grad is not None for n, p in namespace["model"].named_parameters() if "alpha" in n)


def test_ci_runs_the_readme_test_command():
    readme = _readme()
    assert "bash scripts/setup_venv.sh && .venv/bin/python -m pytest -q tests" in readme
    assert "bash scripts/setup_venv.sh && .venv/bin/python -m pni_fast demo" in readme
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "bash scripts/setup_venv.sh" in ci and ".venv/bin/python -m pytest -q tests" in ci
