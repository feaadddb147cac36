"""Moved to `pni_fast.robust.evaluate`; this name stays importable and *is* that module (same object)."""

import sys

from .robust import evaluate as _module

sys.modules[__name__] = _module
