"""Moved to `pni_fast.robust.data`; this name stays importable and *is* that module (same object)."""

import sys

from .robust import data as _module

sys.modules[__name__] = _module
