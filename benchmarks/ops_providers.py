"""The providers the op benchmark compares: each one's ``fn(v, alpha)`` for a case, or the reason it
cannot run (``Unavailable``), and the torch.compile settings they are measured under.

reference (``std().item()`` + stored noise), eager (the same math without ``.item()``), compile
(``torch.compile`` of eager) and ``pni_fast-<backend>`` for every backend; see ``bench_ops.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch

from benchmarks.ops_cases import BASE_PROVIDERS, PNI_BACKENDS, Case

__all__ = ["Unavailable", "Providers", "COMPILE_SETTINGS"]


class Unavailable(Exception):
    """A provider that cannot run this case; the message is the reason, recorded as such."""


def _eager_inject(x: torch.Tensor, alpha: torch.Tensor, inner: int) -> torch.Tensor:
    """Activation noise without ``.item()``: the eager/compile baseline for activations."""
    from pni_fast.reference import alpha_view

    sigma = x.detach().std()
    shape, a = alpha_view(alpha, x.numel(), inner)
    z = torch.randn_like(x)
    return (x.reshape(shape) + a * (sigma * z).reshape(shape)).reshape(x.shape)


class Providers:
    """Builds each provider's ``fn(v, alpha)`` for a case, or raises Unavailable with the reason."""

    def __init__(self, device: torch.device, *, compile_: bool, compile_reason: str, slow_max_numel: Optional[int]):
        self.device = device
        self.compile_reason = compile_reason if not compile_ else None
        self.slow_max_numel = slow_max_numel
        self._compiled: dict[str, Callable] = {}
        self._compile_failed: dict[tuple, str] = {}
        try:
            from pni_fast import reference

            self.reference = reference
            self.reference_error: Optional[str] = None
        except Exception as exc:
            self.reference = None
            self.reference_error = f"pni_fast.reference failed to import: {type(exc).__name__}: {exc}"
        try:
            from pni_fast import functional

            self.functional = functional
            self.functional_error: Optional[str] = None
        except Exception as exc:
            self.functional = None
            self.functional_error = f"pni_fast.functional failed to import: {type(exc).__name__}: {exc}"
        if compile_:
            import torch._dynamo.config as dcfg
            import torch._inductor.config as icfg

            icfg.compile_threads = 1  # no background compile workers competing with the timed code

            # Many shapes/dtypes recompile the same function: raise the limit so dynamo never
            # silently falls back to eager after 8 recompiles (that would mislabel eager as compiled).
            for key in ("cache_size_limit", "recompile_limit"):
                if hasattr(dcfg, key):
                    setattr(dcfg, key, 1024)

    def names(self) -> list[str]:
        return list(BASE_PROVIDERS) + [f"pni_fast-{b}" for b in PNI_BACKENDS]

    def _eager(self, case: Case) -> Callable:
        ref = self.reference
        if case.kind == "weight":
            return ref.compile_friendly_noisy_weight
        _, inner = case.alpha_layout()
        return lambda v, a: _eager_inject(v, a, inner)

    def build(self, name: str, case: Case) -> Callable:
        if name in BASE_PROVIDERS and self.reference is None:
            raise Unavailable(self.reference_error)
        if name == "reference":
            if case.kind == "weight":
                return self.reference.reference_noisy_weight
            _, inner = case.alpha_layout()
            return lambda v, a: self.reference.reference_inject_noise(v, a, inner)
        if name == "eager":
            return self._eager(case)
        if name == "compile":
            if self.compile_reason:
                raise Unavailable(self.compile_reason)
            key = (case.kind, case.alpha, case.dtype, case.mode == "backward")
            if key in self._compile_failed:
                raise Unavailable(self._compile_failed[key])
            return self._compiled_fn(case)
        backend = name.removeprefix("pni_fast-")
        if self.functional is None:
            raise Unavailable(self.functional_error)
        from pni_fast.ops import registry as backends

        try:
            backends.resolve_backend(backend, self.device)
        except (RuntimeError, ValueError) as exc:
            raise Unavailable(str(exc)) from None
        if backend == "triton" and self.device.type == "cpu":
            raise Unavailable("triton on CPU runs only in the TRITON_INTERPRET=1 interpreter: not a speed measurement")
        if backend == "torch" and self.slow_max_numel is not None and case.numel > self.slow_max_numel:
            raise Unavailable(
                f"skipped: the pure-PyTorch Philox backend is slow on CPU; sizes above "
                f"--slow-max-numel={self.slow_max_numel} are not run by default"
            )
        f = self.functional
        if case.kind == "weight":
            return lambda v, a: f.noisy_weight(v, a, backend=backend)
        return lambda v, a: f.inject_noise(v, a, backend=backend)

    def _compiled_fn(self, case: Case) -> Callable:
        """``torch.compile`` of the eager math; one compiled function per kind (and per retain mode).

        The backward-only timing calls backward repeatedly on one retained graph, which AOTAutograd
        refuses when the compiled backward donates its saved buffers. That pass therefore uses a
        separate function (its own dynamo cache), measured under ``donated_buffer=False``
        (``measure_context``); forward and fwd_bwd use the default compiled path users get.
        """
        retained = case.mode == "backward"
        key = f"{case.kind}{'-retained' if retained else ''}"
        if key not in self._compiled:
            # Separate def statements on purpose: dynamo caches per code object, and the retained
            # variant must not reuse a graph compiled with donated buffers.
            if case.kind == "weight":
                eager = self.reference.compile_friendly_noisy_weight
                if retained:

                    def target(v: torch.Tensor, a: torch.Tensor, inner: int) -> torch.Tensor:
                        return eager(v, a)
                else:

                    def target(v: torch.Tensor, a: torch.Tensor, inner: int) -> torch.Tensor:  # type: ignore[misc]
                        return eager(v, a)
            elif retained:

                def target(v: torch.Tensor, a: torch.Tensor, inner: int) -> torch.Tensor:  # type: ignore[misc]
                    return _eager_inject(v, a, inner)
            else:
                target = _eager_inject  # type: ignore[assignment]
            self._compiled[key] = torch.compile(target, fullgraph=True)
        fn = self._compiled[key]
        _, inner = case.alpha_layout()
        return lambda v, a: fn(v, a, inner)

    def measure_context(self, name: str, case: Case) -> contextlib.AbstractContextManager:
        """Settings held for the whole measurement of one case (compile, calls, timing, memory).

        The backward-only pass of ``compile`` runs with ``donated_buffer=False``: AOTAutograd may
        compile the backward lazily at its first call (dynamic shapes), so the setting must hold
        then too, not only while the forward is traced.
        """
        if name == "compile" and case.mode == "backward":
            import torch._functorch.config as fcfg

            return fcfg.patch(donated_buffer=False)
        return contextlib.nullcontext()

    def note_compile_failure(self, case: Case, reason: str) -> None:
        self._compile_failed[(case.kind, case.alpha, case.dtype, case.mode == "backward")] = reason


COMPILE_SETTINGS = (
    "torch.compile(fullgraph=True), default mode and inductor settings except compile_threads=1 "
    "(in-process compilation); dynamic shapes as torch decides (a second shape recompiles dynamic); "
    "backward-only pass measured with torch._functorch.config.donated_buffer=False"
)
