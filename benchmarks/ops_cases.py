"""What the op benchmark measures: the grid of cases (tensor, shape, dtype, alpha layout, pass) and the
bytes model its GB/s figures use.

Kept apart from the timing loop (``bench_ops.py``) and the report (``ops_report.py``) so the grid can be
read, and tested, without running anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "WEIGHT_SHAPES",
    "DEFAULT_SIZES",
    "DEFAULT_SIZES_GPU",
    "QUICK_SIZES",
    "ACTIVATION_SHAPES",
    "QUICK_ACTIVATION_SHAPES",
    "MODES",
    "ALPHA_MODES",
    "DTYPES",
    "PNI_BACKENDS",
    "BASE_PROVIDERS",
    "BYTES_MODEL",
    "weight_shape",
    "Case",
    "default_cases",
    "bytes_moved",
]

# Weight shapes for the default sizes: real layer shapes where one exists (ResNet-20's first
# 16->16 conv is 2,304 elements), square linear layers above.
WEIGHT_SHAPES: dict[int, tuple[int, ...]] = {
    2304: (16, 16, 3, 3),
    36864: (64, 64, 3, 3),
    65536: (256, 256),
    262144: (512, 512),
    1048576: (1024, 1024),
    4194304: (2048, 2048),
    8388608: (2048, 4096),
    16777216: (4096, 4096),
}
DEFAULT_SIZES = (2304, 65536, 1048576, 4194304, 16777216)
# On a GPU the sweep is cheap: add 8M, the size the GPU targets are stated at.
DEFAULT_SIZES_GPU = (2304, 65536, 1048576, 4194304, 8388608, 16777216)
QUICK_SIZES = (2304,)
# Batch-128 CIFAR ResNet-20 activations, one per stage.
ACTIVATION_SHAPES = ((128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8))
QUICK_ACTIVATION_SHAPES = ((2, 16, 8, 8),)
MODES = ("forward", "backward", "fwd_bwd")
ALPHA_MODES = ("layerwise", "channelwise", "elementwise")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PNI_BACKENDS = ("cpu", "cuda", "triton", "torch")
BASE_PROVIDERS = ("reference", "eager", "compile")


def weight_shape(numel: int) -> tuple[int, ...]:
    """A 2-D/4-D weight shape of ``numel`` elements (output channels first)."""
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"size must be a positive integer number of elements, got {numel!r}")
    if numel in WEIGHT_SHAPES:
        return WEIGHT_SHAPES[numel]
    rows = max(d for d in range(1, math.isqrt(numel) + 1) if numel % d == 0)
    return (rows, numel // rows)


@dataclass(frozen=True)
class Case:
    """One measurement point: what tensor, which alpha layout, which pass."""

    kind: str  # "weight" (noisy_weight) or "activation" (inject_noise)
    shape: tuple[int, ...]
    dtype: str  # key of DTYPES
    alpha: str  # layerwise | channelwise | elementwise
    mode: str  # forward | backward | fwd_bwd

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def alpha_layout(self) -> tuple[tuple[int, ...], int]:
        """``(alpha shape, inner)`` under the contract's broadcasting rule."""
        if self.alpha == "layerwise":
            return (1,), 1
        if self.kind == "weight":
            if self.alpha == "channelwise":
                return (self.shape[0],) + (1,) * (len(self.shape) - 1), self.numel // self.shape[0]
            return tuple(self.shape), 1
        if self.alpha == "channelwise":  # activation [N, C, H, W]: one alpha per channel
            return (self.shape[1],), math.prod(self.shape[2:])
        return tuple(self.shape[1:]), 1  # per-feature


def default_cases(
    sizes: Optional[tuple[int, ...]] = None, *, full: bool = False, quick: bool = False, device_type: str = "cpu"
) -> list[Case]:
    """The grid: every mode for layerwise fp32 weights at every size, a smaller grid elsewhere.

    ``full`` measures every size x alpha x dtype x mode, weights and activations.
    """
    if quick:
        sizes = sizes or QUICK_SIZES
        acts = QUICK_ACTIVATION_SHAPES
    else:
        sizes = sizes or (DEFAULT_SIZES_GPU if device_type == "cuda" else DEFAULT_SIZES)
        acts = ACTIVATION_SHAPES
    shapes = [weight_shape(n) for n in sizes]
    mid = [s for s in shapes if 2**16 <= math.prod(s) <= 2**20] or shapes[:2]
    cases: list[Case] = []
    if full:
        for shape in shapes:
            for dt in DTYPES:
                for al in ALPHA_MODES:
                    cases += [Case("weight", shape, dt, al, m) for m in MODES]
        for shape in acts:
            for dt in DTYPES:
                for al in ALPHA_MODES:
                    cases += [Case("activation", shape, dt, al, m) for m in MODES]
        return cases
    for shape in shapes:
        cases += [Case("weight", shape, "fp32", "layerwise", m) for m in MODES]
    for shape in mid:
        for al in ("channelwise", "elementwise"):
            cases += [Case("weight", shape, "fp32", al, m) for m in ("forward", "fwd_bwd")]
        cases += [Case("weight", shape, "bf16", "layerwise", m) for m in ("forward", "fwd_bwd")]
    for shape in acts:
        for al in ("layerwise", "channelwise"):
            cases += [Case("activation", shape, "fp32", al, m) for m in ("forward", "fwd_bwd")]
    return cases


def bytes_moved(case: Case, itemsize: int) -> int:
    n = case.numel
    a = math.prod(case.alpha_layout()[0]) if case.alpha != "layerwise" else 0
    fwd = (2 * n + a) * itemsize
    bwd = (n + a) * itemsize
    return {"forward": fwd, "backward": bwd, "fwd_bwd": fwd + bwd}[case.mode]


BYTES_MODEL = (
    "minimum traffic of an ideal kernel: forward = read v + write out (+ read alpha if not layerwise); "
    "backward = read grad (+ write grad alpha); fwd_bwd = both; std pass and stored noise not counted"
)
