"""Optional dependencies of the toolkit, imported on first use with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (pip name, how to install)
_INSTALL = {
    "sklearn": ("scikit-learn", "pip install 'pni_fast[robust]' (or: pip install scikit-learn)"),
    "matplotlib": ("matplotlib", "pip install 'pni_fast[robust]' (or: pip install matplotlib)"),
    "tqdm": ("tqdm", "pip install 'pni_fast[robust]' (or: pip install tqdm)"),
    "torchattacks": (
        "torchattacks",
        "pip install torchattacks (add --no-deps to keep your torch build; torchvision is not needed)",
    ),
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``) or raise ImportError naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".", 1)[0]
        pip_name, how = _INSTALL.get(top, (top, f"pip install {top}"))
        raise ImportError(f"{purpose} needs {pip_name}, an optional dependency of pni_fast: {how}") from e
