"""Moved to `pni_fast.robust.attacks`; this name stays importable and *is* that module (same object)."""

import sys

from .robust import attacks as _module

sys.modules[__name__] = _module
