"""Shared test setup: the Triton interpreter on CPU-only machines, dtype lists (markers: pyproject.toml)."""
import os
import sys

import pytest

# Triton kernels run on CPU tensors only through the interpreter, which must be chosen
# before triton is first imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for philox_oracle

FLOAT_DTYPES = ["float32", "float64", "float16", "bfloat16"]
# Output tolerance per dtype (absolute, on values of order 1).
TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}

requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA device on this machine")

