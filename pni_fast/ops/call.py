"""Calling a ``pni_fast::`` op from Python at the least fixed cost, and trace-time constants.

A small layer's kernel takes a few microseconds, so the Python glue around an op call matters:
``op_overload`` looks each OpOverload up once, ``call`` dispatches below the Autograd key (the
autograd functions of :mod:`pni_fast.ops.autograd` own the differentiation) and ``apply`` runs an
``autograd.Function`` without its per-call signature binding. The eager fast path
(:mod:`pni_fast.ops.fast_path`) uses ``op_overload`` too. ``trace_constant`` marks the lookups
(backend choice, which compiled ops exist) that ``torch.compile`` may evaluate once while tracing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["apply", "call", "op_overload", "trace_constant"]


def trace_constant(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (2 s) at import time:
    that decorator only sets this attribute, which dynamo reads when it traces a call to ``fn``."""
    fn._dynamo_marked_constant = True
    return fn


_C_APPLY = torch._C._FunctionBase.__dict__["apply"]  # the C++ entry point behind Function.apply


def apply(fn: type, *args):
    """``fn.apply(*args)`` without its per-call ``inspect.signature`` binding (~10 us, more than a small
    layer's kernel) when neither torch.func nor torch.compile is active; callers pass every argument
    positionally, so the binding has nothing to do. Under those transforms the regular ``apply`` runs."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return _C_APPLY.__get__(None, fn)(*args)


_OPS: dict = {}


def op_overload(name: str):
    """The OpOverload of ``pni_fast::<name>``, looked up once (``torch.ops`` attribute access costs ~1 us)."""
    op = _OPS.get(name)
    if op is None:
        op = getattr(torch.ops.pni_fast, name).default
        if not torch.compiler.is_compiling():  # dynamo refuses a traced write to this module's dict
            _OPS[name] = op
    return op


def call(name: str, *args, state: Optional[Tensor] = None, below_autograd: bool = True):
    """Call op ``name``; ``rng_state`` is passed only when given (keeps the short schema usable).

    The autograd functions below own the differentiation, so in eager mode the op is dispatched below
    the Autograd key: its registered (Python) autograd kernel would only re-dispatch, at ~5 us a call."""
    op = op_overload(name)
    full = args if state is None else (*args, state)
    if not below_autograd or torch.compiler.is_compiling():
        return op(*full)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*full)
