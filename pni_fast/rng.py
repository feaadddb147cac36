"""Where PNI's seeds come from: drawn per call on the host, or read from a device RNG state.

Two sources, both obeying the counter contract of docs/design.md section 3:

* ``seed=None`` (eager): a fresh seed per call from PyTorch's default CPU generator, so
  ``torch.manual_seed`` makes a run reproducible. It advances that generator and never
  touches the GPU.
* an **RNG state tensor** (``make_rng_state``): ``int64[2] = (seed, counter_base)`` on the
  op's device. The op reads it on the device and the state is then advanced in-stream past
  the counters used, so a captured CUDA graph draws fresh noise on every replay (a host
  seed would be frozen into the graph). The sequence equals the eager one from the same
  starting state. While a CUDA stream is capturing, ``seed=None`` switches to the device's
  default state (:func:`default_rng_state`), which must exist before capture: it is created
  by the first eager call on that device, or by calling :func:`default_rng_state`.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import contract
from .contract import SEED_LIMIT, quads

__all__ = [
    "draw_seed",
    "predict_seeds",
    "manual_seed",
    "own_generator",
    "make_rng_state",
    "default_rng_state",
    "is_rng_state",
    "RngArgs",
    "rng_args",
    "checked_offset",
    "checked_seed",
    "seed_generator",
]

_default_states: dict[torch.device, Tensor] = {}
_own_generator: Optional[torch.Generator] = None


_draw_op = None  # pni_fast::draw_seed once the compiled library is loaded (False: not there)


def _compiled_draw():
    """The compiled library's ``draw_seed`` op (~1 us instead of ~5 us for ``torch.randint(...).item()``,
    the same value), or None without it. A converted model's layers each draw one seed per forward."""
    global _draw_op
    if _draw_op is None:
        from . import _ext

        _draw_op = _ext.load() and hasattr(torch.ops.pni_fast, "draw_seed") and torch.ops.pni_fast.draw_seed.default
    return _draw_op or None


def draw_seed() -> int:
    """A seed in [0, 2**63) from PyTorch's default CPU generator, or from PNI's own generator after
    :func:`manual_seed` (advances it; no GPU sync)."""
    gen = seed_generator()
    if not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        op = _compiled_draw()
        if op is not None:
            return op(gen)
    if under_vmap():
        _check_vmap_randomness()
    if gen is not None:
        return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, generator=gen).item())
    return int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())


def predict_seeds(n: int) -> list[int]:
    """The next ``n`` values :func:`draw_seed` will return, read from a copy of the generator (which is not
    advanced): whole-model batching draws a forward's weight noise ahead with them (pni_fast.batching)."""
    source = _own_generator if _own_generator is not None else torch.default_generator
    copy = source.clone_state()
    return torch.randint(0, SEED_LIMIT - 1, (n,), dtype=torch.int64, generator=copy).tolist()


def _check_vmap_randomness() -> None:
    """Host-drawn seeds are one value per call: a per-sample draw under vmap cannot exist."""
    from torch._functorch.pyfunctorch import coerce_cinterpreter

    for level in torch._C._functorch.get_interpreter_stack() or ():
        interp = coerce_cinterpreter(level)
        randomness = getattr(interp, "randomness", None)
        if randomness is not None and randomness() != "same":
            raise RuntimeError(
                f"pni_fast: PNI noise under torch.func.vmap(randomness={randomness()!r}) is not supported: "
                "each noisy call draws one seed on the host, so every sample of the vmapped batch shares one "
                "noise draw. Pass randomness='same' (per-sample gradients of one noisy model), or loop over "
                "the samples for independent noise per sample."
            )


def manual_seed(seed: Optional[int]) -> None:
    """Give PNI's host-drawn seeds their own generator, seeded with ``seed``; ``None`` goes back to torch's.

    By default (``seed=None`` calls) the seeds come from PyTorch's default CPU generator, so
    ``torch.manual_seed`` makes a whole run reproducible. Code that reseeds torch's generator in the middle
    of an evaluation (torchattacks' APGD calls ``torch.manual_seed`` on every batch) would then replay the
    same noise on every batch; with its own generator PNI's noise stream keeps going.
    """
    global _own_generator
    if seed is None:
        _own_generator = None
        return
    gen = torch.Generator()
    gen.manual_seed(_as_seed(seed))
    _own_generator = gen


@contextlib.contextmanager
def own_generator(seed: Optional[int] = None) -> Iterator[None]:
    """Within the block PNI draws from its own generator (seeded with ``seed``, else with a draw from the
    current source), then the previous source is restored: an evaluation that reseeds torch cannot freeze
    PNI's noise."""
    global _own_generator
    previous = _own_generator
    manual_seed(draw_seed() if seed is None else seed)
    try:
        yield
    finally:
        _own_generator = previous


def _as_int(name: str, value) -> int:
    """``value`` as an int: Python and numpy integers are accepted, bools and floats refused."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    contract.fail("int_type", name=name, type=type(value).__name__)


def _as_seed(value) -> int:
    """A host seed: an int in [0, 2^63) (the contract's ``seed`` rule)."""
    seed = _as_int("seed", value)
    contract.require(0 <= seed < SEED_LIMIT, "seed", seed=seed)
    return seed


def make_rng_state(seed: Optional[int] = None, device: torch.device | str | None = None) -> Tensor:
    """A fresh RNG state ``int64[2] = (seed, 0)`` on ``device`` (seed drawn with :func:`draw_seed` if None)."""
    seed = draw_seed() if seed is None else _as_seed(seed)
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def default_rng_state(device: torch.device | str) -> Tensor:
    """The device's default RNG state used by ``seed=None`` during CUDA-graph capture (created once, seeded
    from torch's CPU generator). Call it before capturing if no eager call ran on the device yet."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    state = _default_states.get(device)
    if state is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"pni_fast: no RNG state exists for {device} yet and none can be created while a CUDA graph is "
                f"being captured; call pni_fast.default_rng_state({str(device)!r}) (or run one eager forward) "
                "before capturing"
            )
        state = make_rng_state(None, device)
        _default_states[device] = state
    return state


def under_vmap() -> bool:
    """True inside ``torch.func.vmap``: values there are per-sample, so no ``.item()`` / host checks."""
    if torch.compiler.is_compiling():
        return False
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)


def is_rng_state(seed) -> bool:
    return isinstance(seed, Tensor)


def _check_state(state: Tensor, device: torch.device) -> None:
    if state.dtype != torch.int64 or state.shape != (2,):
        raise ValueError(
            f"seed given as a tensor must be an RNG state: int64 of shape [2] (seed, counter), got "
            f"{state.dtype} of shape {list(state.shape)}; make one with pni_fast.make_rng_state"
        )
    if state.device != device:
        raise ValueError(f"the RNG state must be on the tensor's device {device}, got {state.device}")
    if not state.is_contiguous():
        raise ValueError("the RNG state must be contiguous")
    if state.requires_grad:
        raise ValueError("the RNG state must not require grad")


@dataclass
class RngArgs:
    """What one op call uses: a host seed, or a snapshot of a device state (then ``seed`` is 0)."""

    seed: int
    offset: int
    state: Optional[Tensor]  # snapshot the op reads (saved for the backward)
    _live: Optional[Tensor]  # the user's state, advanced by ``advance``
    _used: int

    def advance(self) -> None:
        """Move the live state past the counters this call used (an in-stream kernel; graph-replayable)."""
        if self._live is not None and self._used:
            self._live[1:].add_(self._used)


def checked_offset(offset, numel: int) -> int:
    """``offset`` as an int, checked by the contract's counter rules for a call drawing ``numel`` values."""
    offset = _as_int("offset", offset)
    contract.require(offset >= 0, "offset", offset=offset)
    contract.check_offset_fits(offset, numel)
    return offset


def checked_seed(seed) -> Optional[int]:
    """A host seed as an int in [0, 2**63) (Python or numpy integer), or None (draw one)."""
    return None if seed is None else _as_seed(seed)


def seed_generator() -> Optional[torch.Generator]:
    """The generator host seeds come from: PNI's own after :func:`manual_seed`, else None (torch's default).

    A forward that runs inside a backward pass is a recompute (activation checkpointing): torch restores
    its own generators for it, so the recompute draws the seeds of the original forward, but it does not
    know PNI's own generator, whose next draw would give the recompute different noise: refused."""
    if _own_generator is not None and torch._C._current_graph_task_id() != -1:
        raise RuntimeError(
            "pni_fast: a PNI forward is running inside a backward pass (activation checkpointing recomputing a "
            "forward?) while pni_fast.manual_seed / own_generator is active; torch.utils.checkpoint restores "
            "torch's generators for the recompute but not PNI's own, so the recompute would draw different "
            "noise than the forward. Use torch.manual_seed (pni_fast.manual_seed(None)) with checkpointing."
        )
    return _own_generator


def rng_args(seed, offset, device: torch.device, numel: int) -> RngArgs:
    """Validate ``seed``/``offset`` and pick the seed source for a call drawing ``numel`` values."""
    offset = checked_offset(offset, numel)
    if seed is None and torch.compiler.is_exporting():
        # an exported program must draw on every call: a state made by a tensor op inside the graph
        drawn = torch.randint(0, SEED_LIMIT - 1, (1,), dtype=torch.int64, device=device)
        seed = torch.cat([drawn, torch.zeros(1, dtype=torch.int64, device=device)])
    if seed is None and device.type == "cuda" and not torch.compiler.is_compiling():
        if torch.cuda.is_current_stream_capturing():
            seed = default_rng_state(device)
        else:
            default_rng_state(device)  # exists before any capture
    if isinstance(seed, Tensor):
        _check_state(seed, device)
        if device.type == "cpu" and not torch.compiler.is_compiling() and not under_vmap():
            s, base = (int(v) for v in seed.tolist())
            contract.require(s >= 0, "rng_state_seed", seed=s)
            contract.require(base >= 0, "rng_state_base", base=base)
            contract.check_state_counter(base, offset, numel)
        return RngArgs(0, offset, seed.clone(), seed, offset + quads(numel))
    seed = draw_seed() if seed is None else _as_seed(seed)
    return RngArgs(seed, offset, None, None, 0)
