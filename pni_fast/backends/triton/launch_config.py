"""What the single-tensor and the list ops of the Triton backend launch with.

Block size and warps of the element-wise kernels, whether the kernels run compiled (PRECISE
libdevice math) or in the CPU interpreter, the int32/int64 choice of the alpha index, the plan of
the two-stage alpha gradient (segment mode and partial-buffer sizes, see alpha_grad_kernels.py)
and the tiles of its stage 2, the device guard of a launch and the ``rng_state`` argument.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .alpha_grad_kernels import SEG_ELEM, SEG_ONE, SEG_SCAN, SEG_TWO
from .noise_kernels import noise_kernel

__all__: list[str] = []  # used by the launchers (single_ops, list_ops)

# Elements per program of the element-wise kernels (BLOCK / 4 Philox counters each).
BLOCK = 1024
NUM_WARPS = 4
# Elements of one stage-2 tile (BLOCK_J * BLOCK_R * BLOCK_K).
_REDUCE_TILE = 4096
_INT32_LIMIT = 2**31

# True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED: bool = type(noise_kernel).__name__ == "InterpretedFunction"
# Compiled kernels compute Box-Muller with libdevice's accurate logf/cosf/sinf (noise_kernels.py,
# normal_block); the interpreter cannot call libdevice and runs tl.randn4x in numpy instead.
PRECISE: bool = not INTERPRETED


def index64(n_alpha: int, inner: int) -> bool:
    """Whether the alpha index needs int64 arithmetic in the kernel."""
    return n_alpha + BLOCK >= _INT32_LIMIT or inner + BLOCK >= _INT32_LIMIT


@dataclass(frozen=True)
class _GradPlan:
    """How the alpha gradient of one tensor is reduced (see alpha_grad_kernels.py's docstring)."""

    seg_mode: int
    inner: int  # effective inner (layerwise: a multiple of BLOCK covering the whole tensor)
    S: int  # segments
    J: int  # partial slots per segment (max blocks a segment spans)
    R: int  # rows of segments per alpha index
    direct: bool  # elementwise: stage 1 writes the gradient itself


def grad_plan(n: int, n_alpha: int, inner: int, general: bool = False) -> _GradPlan:
    """Plan for n > 0 elements; ``general`` forces the segmented-scan stage 1 (multi-tensor kernel)."""
    if n_alpha == 1:
        inner = triton.cdiv(n, BLOCK) * BLOCK
    S = triton.cdiv(n, inner)
    R = triton.cdiv(S, n_alpha)
    if inner % BLOCK == 0:
        J = inner // BLOCK
    else:
        J = triton.cdiv(inner - 1, BLOCK) + 1
    if general:
        mode = SEG_SCAN
    elif inner % BLOCK == 0:
        mode = SEG_ONE
    elif inner > BLOCK:
        mode = SEG_TWO
    elif inner == 1:
        mode = SEG_ELEM
    else:
        mode = SEG_SCAN
    direct = mode == SEG_ELEM and n_alpha == n
    return _GradPlan(mode, inner, S, J, R, direct)


def reduce_tiles(n_alpha: int, J: int, R: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_J, BLOCK_R) of the stage-2 kernel: alpha indices x slots x rows per tile."""
    block_k = min(triton.next_power_of_2(max(n_alpha, 1)), 256)
    budget = _REDUCE_TILE // block_k
    block_j = min(triton.next_power_of_2(max(J, 1)), budget)
    block_r = max(1, min(triton.next_power_of_2(max(R, 1)), budget // block_j))
    return block_k, block_j, block_r


def launch_guard(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def state_args(rng_state: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(state pointer, HAS_STATE): without a state the kernels get an unread input tensor."""
    return (dummy, False) if rng_state is None else (rng_state, True)
