"""PEP 517 build backend of pni_fast: setuptools' backend, building against the target's torch.

A C++ extension written against ATen (not the LibTorch stable ABI) must be compiled against
the very torch it will run with. pip's default build isolation hides the environment being
installed into, so a plain ``pip install .`` used to find no torch and ship a pure-Python
wheel. Declaring ``torch`` as a build requirement would download a second torch (gigabytes
for a CUDA build, possibly another version or variant than the user's). Instead, when the
isolated environment has no torch, this backend finds the torch already installed in the
target environment (the interpreter's own site-packages, which pip's isolation removed from
sys.path, or the active VIRTUAL_ENV / CONDA_PREFIX) and appends its folder to sys.path, so
setup.py builds against exactly that torch. Packages of the build environment (setuptools,
wheel, ninja) keep precedence. Without any torch, setup.py installs pure Python (the kernels
then compile just in time on first use). Details and measurements: docs/install.md.

pip shows a backend's output only with ``-v`` or when the build fails. What a successful build
left out (no torch, a failed optional compile, CUDA kernels not built) is still printed in pip's
normal output: setup.py hands that one line over (``PNI_FAST_BUILD_NOTICE``) and build_wheel /
build_editable raise it as a UserWarning, which pip >= 25.3 shows for a local project, or (older
pip) write it to the terminal pip runs in (``/dev/tty``); always also to the log.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import warnings
from importlib import metadata
from typing import Optional

from setuptools import build_meta as _setuptools
from setuptools.build_meta import build_sdist, get_requires_for_build_sdist  # noqa: F401  (re-exported)


def _log(msg: str) -> None:
    print(f"pni_fast build: {msg}", file=sys.stderr, flush=True)


NOTICE_ENV = "PNI_FAST_BUILD_NOTICE"  # pni_fast/_build_config.py NOTICE_ENV (setup.py sets it)


def frontend_shows_warnings() -> bool:
    """Whether the frontend running this hook shows the hook's UserWarnings in its normal output.

    pip >= 25.3 runs hooks through pyproject_hooks' in-process script, which records warnings
    (`catch_warnings(record=True)`) and hands them to pip, which logs them at WARNING level for a
    local project (`pip install .`). Older runners drop them.
    """
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        with open(path, encoding="utf-8") as f:
            return "catch_warnings(record=True)" in f.read()
    except (OSError, TypeError):
        return False


def announce(msg: str, tty_path: str = "/dev/tty") -> str:
    """Print `msg` where the user sees it in pip's normal output; returns the channel used.

    pip keeps a successful backend's output (stdout, stderr) for `-v` only. Always: the log
    (stderr). Then "warning" when the frontend shows the hook's warnings (pip >= 25.3, see
    frontend_shows_warnings), else "tty": the controlling terminal pip runs in, or "log" (no
    terminal, e.g. CI: `pip install -v` shows the log line).
    """
    line = f"pni_fast: NOTE: {msg}"
    print(line, file=sys.stderr, flush=True)
    if frontend_shows_warnings():
        warnings.warn(line, UserWarning, stacklevel=2)
        return "warning"
    try:
        if sys.stderr.isatty():
            return "tty"  # already on the terminal
    except (AttributeError, ValueError):
        pass
    try:
        with open(tty_path, "w", encoding="utf-8") as tty:
            tty.write(f"\n{line}\n")  # pip's spinner line has no newline yet
        return "tty"
    except OSError:
        return "log"


def _build_announced(build, *args):
    os.environ.pop(NOTICE_ENV, None)  # only what this build says
    result = build(*args)
    msg = os.environ.pop(NOTICE_ENV, None)
    if msg:
        announce(msg)
    return result


def _site_dirs_of_prefix(prefix: str) -> list[str]:
    paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
    return [paths["purelib"], paths["platlib"]]


def target_site_dirs() -> list[str]:
    """Folders the target environment imports from, most specific first (duplicates removed)."""
    dirs = list(site.getsitepackages())  # pip's default isolation runs the target's own interpreter
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):  # isolation in a separate venv (pip's venv mode, build)
        if os.environ.get(var):
            dirs += _site_dirs_of_prefix(os.environ[var])
    if sys.prefix == sys.base_prefix:  # not a venv: `pip install --user torch` is visible too
        dirs.append(site.getusersitepackages())
    seen, out = set(), []
    for d in dirs:
        key = os.path.normcase(os.path.abspath(d))
        if key not in seen and os.path.isdir(d):
            seen.add(key)
            out.append(d)
    return out


def find_torch(dirs: list[str]) -> Optional[tuple[str, str]]:
    """(version, site folder) of the first torch installed in `dirs`, read from metadata (no import)."""
    for d in dirs:
        for dist in metadata.distributions(path=[d]):
            if (dist.metadata["Name"] or "").lower() == "torch" and os.path.isdir(os.path.join(d, "torch")):
                return dist.version, d
    return None


def expose_target_torch(quiet: bool = False) -> Optional[str]:
    """Make the target environment's torch importable here; returns where it is, None if there is none."""
    try:
        import torch  # no isolation, or a torch the build environment already has

        return os.path.dirname(os.path.dirname(torch.__file__))
    except ImportError:
        pass
    found = find_torch(target_site_dirs())
    if found is None:
        if not quiet:
            _log("no torch in the target environment: installing without compiled kernels")
        return None
    version, folder = found
    sys.path.append(folder)  # after the build environment's own folders
    if not quiet:
        _log(f"building against the target environment's torch {version} ({folder})")
    return folder


# Every hook that runs setup.py sees the same torch (its metadata hooks run it too).


def get_requires_for_build_wheel(config_settings=None):
    expose_target_torch(quiet=True)
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    expose_target_torch(quiet=True)
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    expose_target_torch(quiet=True)
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    expose_target_torch(quiet=True)
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    # a user's install: a failed compile (no compiler) installs without the kernels (setup.py says
    # why; they compile just in time later) instead of failing. Editable (developer) builds fail.
    os.environ.setdefault("PNI_FAST_BUILD_OPTIONAL", "1")
    expose_target_torch()
    return _build_announced(_setuptools.build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    expose_target_torch()
    return _build_announced(_setuptools.build_editable, wheel_directory, config_settings, metadata_directory)
