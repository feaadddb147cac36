"""The eager fast path: a whole ``noisy_weight`` / ``noisy_weights`` forward in one op call.

A small layer's kernel takes ~3 us, so the separate steps of the general path (sigma op, finite
checks through ``.item()``, a seed from ``torch.randint(...).item()``, the perturb op, a Python
``autograd.Function``) cost more than the work. On CPU with the compiled library,
``pni_fast::noisy`` / ``noisy_multi`` (csrc/cpu/noisy_cpu.cpp) do them all in C++, with a C++
autograd node whose backward regenerates the noise like the general path's. The results are
bit-identical to the general path: the same sigma definition, the same checks and messages, the
same seed drawn from the same generator (``torch.manual_seed`` / ``pni_fast.manual_seed`` still
decide the noise), the same kernels forward and backward (tests/ops/test_fast_path.py).

Only plain eager calls take it: under ``torch.compile``, export or a ``torch.func`` transform the
general path (pure ops with fake kernels and Python autograd, which those need) runs; so do
float64 tensors (their sigma is ``torch.std``), RNG-state seeds and the other backends.
``ENABLED = False`` switches the fast path off (benchmarks compare the two; tests that spy on
``rng.draw_seed`` use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .call import op_overload

__all__ = ["ENABLED", "SAVE_NOISE_MAX_ELEMENTS", "usable", "multi_dtype_ok", "noisy", "noisy_multi"]

ENABLED = True
# noisy_weights keeps the forward's noise for the backward (float32, one value per weight) when all
# tensors together hold at most this many elements, and regenerates it otherwise: regenerating costs
# as much as drawing it in the forward, storing costs memory. 4M elements = 16 MB, above every CIFAR
# ResNet (ResNet-20: 268K weights, ~1 MB); the results are the same bits either way. 0: never store.
SAVE_NOISE_MAX_ELEMENTS = 1 << 22
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_available: Optional[bool] = None


def _library_has_it() -> bool:
    global _available
    if _available is None:
        _available = _ext.load() and _ext.has_op("noisy", "cpu") and _ext.has_op("noisy_multi", "cpu")
    return _available


def usable(backend: str, t: Tensor, seed) -> bool:
    """True when this call may take the fast path: eager, the C++ CPU backend, a float32/float16/bfloat16
    tensor, a host seed (None or int)."""
    return (
        ENABLED
        and backend == "cpu"
        and t.device.type == "cpu"
        and t.dtype in _FUSED_DTYPES
        and not isinstance(seed, Tensor)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and _library_has_it()
    )


def multi_dtype_ok(vs: Sequence[Tensor]) -> bool:
    """``noisy_multi`` takes one dtype among float32/float16/bfloat16 (one ``sigma_multi`` call)."""
    dtype = vs[0].dtype
    return all(v.dtype == dtype for v in vs)


def noisy(
    v: Tensor,
    alpha: Tensor,
    offset: int,
    inner: int,
    seed: Optional[int],
    name: str,
    generator: Optional[torch.Generator],
) -> Tensor:
    """The fast path of ``pni_fast.functional._perturb`` (arguments already checked)."""
    return op_overload("noisy")(v, alpha, offset, inner, seed, generator, name)


def noisy_multi(
    vs: Sequence[Tensor],
    alphas: Sequence[Tensor],
    offsets: list[int],
    inners: list[int],
    seeds: Optional[list[int]],
    name: str,
    generator: Optional[torch.Generator],
) -> list[Tensor]:
    """The fast path of :func:`pni_fast.functional.noisy_weights` (arguments already checked): ``seeds``
    None draws one seed shared by all tensors, else one seed shared (length 1) or one per tensor."""
    return op_overload("noisy_multi")(
        list(vs),
        list(alphas),
        offsets,
        inners,
        seeds,
        generator,
        name,
        SAVE_NOISE_MAX_ELEMENTS,
    )
