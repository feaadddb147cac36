"""Moved to `pni_fast.robust.checkpoint`; this name stays importable and *is* that module (same object)."""

import sys

from .robust import checkpoint as _module

sys.modules[__name__] = _module
