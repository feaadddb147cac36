"""Moved to `pni_fast.robust.train`; this name stays importable and *is* that module (same object)."""

import sys

from .robust import train as _module

sys.modules[__name__] = _module
