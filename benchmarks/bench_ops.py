"""Op benchmark: one PNI noise op, every provider side by side, against torch.clone.

Providers (each listed, with a reason when it cannot run):
  reference          paper-faithful: ``std().item()`` host sync + stored ``normal_`` noise
  eager              the same math without ``.item()`` (sigma stays a 0-d tensor)
  compile            ``torch.compile(fullgraph=True)`` of ``eager``
  pni_fast-<b>       ``pni_fast.functional.noisy_weight`` / ``inject_noise`` with ``backend=b``
                     for b in cpu, cuda, triton, torch
and ``torch.clone`` of the same tensor, timed in the same run: one read + one write, the floor
of any out-of-place op.

Bytes model for GB/s (stated in every record): the minimum traffic of an ideal kernel,
forward = read v + write out (+ read alpha); backward = read grad (+ write grad alpha; the
gradient of v is the incoming gradient itself, no copy); fwd+bwd = both. The std pass and any
stored noise are NOT counted, so GB/s compares providers on the same work and equals
``2 * numel * itemsize / time`` for a clone.

Inputs require grad in every mode (a training forward builds the graph and saves what
backward needs); gradients come from ``torch.autograd.grad`` so nothing accumulates into ``.grad``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # the CPU memory profiler's start/stop lines are noise here
# compile in-process: inductor's pool of compile workers would otherwise start in the background and
# compete with the timed code for the cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

__all__ = ["Case", "default_cases", "run", "summary_rows", "write_outputs", "main"]

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
        from pni_fast import backends

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


def _bytes_moved(case: Case, itemsize: int) -> int:
    n = case.numel
    a = math.prod(case.alpha_layout()[0]) if case.alpha != "layerwise" else 0
    fwd = (2 * n + a) * itemsize
    bwd = (n + a) * itemsize
    return {"forward": fwd, "backward": bwd, "fwd_bwd": fwd + bwd}[case.mode]


BYTES_MODEL = (
    "minimum traffic of an ideal kernel: forward = read v + write out (+ read alpha if not layerwise); "
    "backward = read grad (+ write grad alpha); fwd_bwd = both; std pass and stored noise not counted"
)


COMPILE_SETTINGS = (
    "torch.compile(fullgraph=True), default mode and inductor settings except compile_threads=1 "
    "(in-process compilation); dynamic shapes as torch decides (a second shape recompiles dynamic); "
    "backward-only pass measured with torch._functorch.config.donated_buffer=False"
)


def _call_for(case: Case, fn: Callable, v: torch.Tensor, alpha: torch.Tensor, g: torch.Tensor) -> Callable:
    if case.mode == "forward":
        return lambda: fn(v, alpha)
    if case.mode == "backward":
        out = fn(v, alpha)
        return lambda: torch.autograd.grad(out, (v, alpha), g, retain_graph=True)
    return lambda: torch.autograd.grad(fn(v, alpha), (v, alpha), g)


def _case_fields(case: Case) -> dict[str, Any]:
    return {
        "kind": case.kind,
        "shape": list(case.shape),
        "numel": case.numel,
        "dtype": case.dtype,
        "alpha_mode": case.alpha,
        "alpha_numel": math.prod(case.alpha_layout()[0]),
        "mode": case.mode,
    }


def _measure(
    rec: dict[str, Any],
    fn: Callable,
    case: Case,
    v: torch.Tensor,
    alpha: torch.Tensor,
    g: torch.Tensor,
    device: torch.device,
    min_run_time: float,
    measure_memory: bool,
    peak_gbs: Optional[float],
    itemsize: int,
    clone_ms: float,
) -> None:
    """Time (and measure the memory of) one provider on one case; fills ``rec``."""
    call = _call_for(case, fn, v, alpha, g)
    t0 = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rec["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    # warm up for a while, not one call: caches, allocator and (for compile) lazily built pieces settle
    warm_until = time.perf_counter() + (0.5 if rec["provider"] == "compile" else 0.05)
    call()
    while time.perf_counter() < warm_until:
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = common.time_call(call, device, min_run_time)
    rec.update(t, status="ok", reason=None)
    nbytes = _bytes_moved(case, itemsize)
    rec["bytes_moved"] = nbytes
    rec["gbs"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
    rec["x_clone"] = t["median_ms"] / clone_ms
    rec["frac_peak_bw"] = rec["gbs"] / peak_gbs if peak_gbs else None
    if measure_memory:
        rec["peak_mem_bytes"], rec["memory_method"] = common.peak_extra_bytes(call, device)


def run(
    cases: list[Case],
    device: torch.device,
    *,
    compile_: bool = True,
    compile_reason: str = "",
    slow_max_numel: Optional[int] = None,
    min_run_time: float = 0.2,
    measure_memory: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every provider on every case; returns ``(meta, records)`` (one record per measurement)."""
    env = common.environment(device)
    peak_gbs, peak_src = common.peak_bandwidth(device)
    providers = Providers(device, compile_=compile_, compile_reason=compile_reason, slow_max_numel=slow_max_numel)
    meta = dict(
        env,
        peak_bw_gbs=peak_gbs,
        peak_bw_source=peak_src,
        bytes_model=BYTES_MODEL,
        benchmark="ops",
        compile_settings=COMPILE_SETTINGS if compile_ else compile_reason,
    )
    base = {k: env[k] for k in ("device", "device_slug", "torch", "cuda", "triton", "date_utc", "threads")}
    base["load_avg_1"] = env["load_avg_1_5_15"][0] if env["load_avg_1_5_15"] else None
    records: list[dict[str, Any]] = []
    clone_ms: dict[tuple, float] = {}
    torch.manual_seed(0)
    for i, case in enumerate(cases):
        dtype = DTYPES[case.dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        v = torch.randn(case.shape, device=device, dtype=dtype).requires_grad_()
        ashape, _ = case.alpha_layout()
        alpha = torch.full(ashape, 0.25, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(case.shape, device=device, dtype=dtype)
        ckey = (case.shape, case.dtype)
        if ckey not in clone_ms:
            src = v.detach()
            src.clone()
            t = common.time_call(lambda: src.clone(), device, min_run_time)
            clone_ms[ckey] = t["median_ms"]
            mem, mem_method = common.peak_extra_bytes(lambda: src.clone(), device) if measure_memory else (None, None)
            nbytes = 2 * case.numel * itemsize
            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rec = dict(base, **_case_fields(Case(case.kind, case.shape, case.dtype, "layerwise", "forward")))
            rec.update(alpha_mode=None, alpha_numel=None)
            records.append(
                dict(
                    rec,
                    provider="torch.clone",
                    status="ok",
                    reason=None,
                    **t,
                    bytes_moved=nbytes,
                    gbs=gbs,
                    clone_ms=t["median_ms"],
                    x_clone=1.0,
                    frac_peak_bw=gbs / peak_gbs if peak_gbs else None,
                    peak_mem_bytes=mem,
                    memory_method=mem_method,
                    speedup_vs_reference=None,
                    speedup_vs_compile=None,
                    first_call_ms=None,
                )
            )
        ref_ms: Optional[float] = None
        compile_ms: Optional[float] = None
        for name in providers.names():
            rec = dict(base, **_case_fields(case), provider=name, clone_ms=clone_ms[ckey])
            try:
                with providers.measure_context(name, case):
                    _measure(
                        rec,
                        providers.build(name, case),
                        case,
                        v,
                        alpha,
                        g,
                        device,
                        min_run_time,
                        measure_memory,
                        peak_gbs,
                        itemsize,
                        clone_ms[ckey],
                    )
                if name == "reference":
                    ref_ms = rec["median_ms"]
                if name == "compile":
                    compile_ms = rec["median_ms"]
                rec["speedup_vs_reference"] = ref_ms / rec["median_ms"] if ref_ms else None
                rec["speedup_vs_compile"] = compile_ms / rec["median_ms"] if compile_ms else None
            except Unavailable as exc:
                rec.update(status="unavailable", reason=str(exc))
            except Exception as exc:  # a provider that crashes is reported, not hidden
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                if name == "compile":
                    providers.note_compile_failure(case, f"torch.compile failed: {reason}")
                    rec.update(status="unavailable", reason=f"torch.compile failed: {reason}")
                else:
                    rec.update(status="error", reason=reason)
            records.append(rec)
            status = f"{rec['median_ms']:.4g} ms" if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}"
            log(
                f"[ops {i + 1}/{len(cases)}] {case.kind} {list(case.shape)} {case.dtype} {case.alpha} "
                f"{case.mode} {name}: {status}"
            )
        del v, alpha, g
    # the load at the end includes this benchmark's own threads; compare with load_avg_1_5_15 at the start
    meta["load_avg_end_1_5_15"] = common.load_average()
    return meta, records


OPS_COLUMNS = [
    ("kind", "tensor"),
    ("shape", "shape"),
    ("numel", "elements"),
    ("dtype", "dtype"),
    ("alpha_mode", "alpha"),
    ("mode", "pass"),
    ("provider", "provider"),
    ("median_ms", "median ms"),
    ("q20_ms", "q20 ms"),
    ("q80_ms", "q80 ms"),
    ("min_ms", "min ms"),
    ("gbs", "GB/s"),
    ("x_clone", "x clone"),
    ("pct_peak", "% peak BW"),
    ("peak_mem_mb", "peak MB"),
    ("speedup_vs_reference", "speed-up vs ref"),
    ("speedup_vs_compile", "speed-up vs compile"),
    ("note", "note"),
]


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with display-only fields (MB, %, note) added."""
    rows = []
    for r in records:
        row = dict(r)
        row["shape"] = "x".join(map(str, r["shape"]))
        row["peak_mem_mb"] = r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None else None
        row["pct_peak"] = 100 * r["frac_peak_bw"] if r.get("frac_peak_bw") is not None else None
        row["note"] = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        rows.append(row)
    return rows


SUMMARY_COLUMNS = [
    ("numel", "elements"),
    ("provider", "provider"),
    ("fwd_ms", "fwd ms"),
    ("fwd_min", "fwd min ms"),
    ("fwd_speedup", "fwd x ref"),
    ("fwd_x_clone", "fwd / clone"),
    ("fb_ms", "fwd+bwd ms"),
    ("fb_min", "fwd+bwd min ms"),
    ("fb_speedup", "fwd+bwd x ref"),
    ("fb_vs_compile", "fwd+bwd x compile"),
    ("fb_mem_mb", "fwd+bwd peak MB"),
    ("fb_mem_sizes", "peak / tensor size"),
    ("note", "note"),
]


def summary_rows(records: list[dict[str, Any]], dtype: str = "fp32") -> list[dict[str, Any]]:
    """Layerwise weight noise per size and provider: forward and fwd+bwd vs reference and clone."""
    sel = [r for r in records if r["kind"] == "weight" and r["dtype"] == dtype]
    rows: list[dict[str, Any]] = []
    for numel in sorted({r["numel"] for r in sel}):
        clone = next((r for r in sel if r["numel"] == numel and r["provider"] == "torch.clone"), None)
        if clone:
            rows.append(
                {
                    "numel": numel,
                    "provider": "torch.clone",
                    "fwd_ms": clone["median_ms"],
                    "fwd_min": clone.get("min_ms"),
                    "fwd_x_clone": 1.0,
                    "fb_mem_mb": None,
                    "note": "",
                }
            )
        names = [p for p in dict.fromkeys(r["provider"] for r in sel) if p != "torch.clone"]
        for name in names:

            def get(mode: str) -> Optional[dict[str, Any]]:
                return next(
                    (
                        r
                        for r in sel
                        if r["numel"] == numel
                        and r["provider"] == name
                        and r["alpha_mode"] == "layerwise"
                        and r["mode"] == mode
                    ),
                    None,
                )

            fwd, fb = get("forward"), get("fwd_bwd")
            if fwd is None and fb is None:
                continue
            row: dict[str, Any] = {"numel": numel, "provider": name}
            bad = [r for r in (fwd, fb) if r is not None and r["status"] != "ok"]
            row["note"] = f"{bad[0]['status']}: {bad[0]['reason']}" if bad else ""
            if fwd is not None and fwd["status"] == "ok":
                row.update(
                    fwd_ms=fwd["median_ms"],
                    fwd_min=fwd.get("min_ms"),
                    fwd_speedup=fwd["speedup_vs_reference"],
                    fwd_x_clone=fwd["x_clone"],
                )
            if fb is not None and fb["status"] == "ok":
                row.update(
                    fb_ms=fb["median_ms"],
                    fb_min=fb.get("min_ms"),
                    fb_speedup=fb["speedup_vs_reference"],
                    fb_vs_compile=fb.get("speedup_vs_compile"),
                )
                if fb.get("peak_mem_bytes") is not None:
                    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
                    row["fb_mem_mb"] = fb["peak_mem_bytes"] / 2**20
                    row["fb_mem_sizes"] = fb["peak_mem_bytes"] / (numel * itemsize)
            rows.append(row)
    return rows


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    """The ops section of a results file: how it was measured, the summary, then every record."""
    lines = [
        f"## Op benchmark: {meta['device']}",
        "",
        f"Command: `{command}`  ",
        f"torch {meta['torch']}, CUDA {meta['cuda']}{common.driver_text(meta)}, triton {meta['triton']}, "
        f"{meta['threads']} threads, "
        f"{meta['date_utc']}, commit {meta['git_commit']}  ",
        f"Load average (1/5/15 min): {meta['load_avg_1_5_15']} at start, {meta.get('load_avg_end_1_5_15')} at end "
        "(the end figure includes this run's own threads)  ",
        f"Peak bandwidth: {common.fmt(meta['peak_bw_gbs'])} GB/s ({meta['peak_bw_source']})  ",
        f"GB/s bytes model: {meta['bytes_model']}  ",
        f"torch.compile: {meta.get('compile_settings')}  ",
        f"Peak memory: {next((r['memory_method'] for r in records if r.get('memory_method')), 'not measured')}; "
        "extra bytes allocated by the call and alive at its peak (output and saved tensors included).",
        "",
        "### Summary: layerwise fp32 weight noise (forward; forward+backward)",
        "",
        "Ratios use medians; the minimum is shown beside the median because it is the figure least "
        "disturbed by other work on a shared machine.",
        "",
        common.markdown_table(summary_rows(records), SUMMARY_COLUMNS),
        "",
        "### All measurements",
        "",
        common.markdown_table(table_rows(records), OPS_COLUMNS),
        "",
    ]
    return "\n".join(lines)


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "ops.json", meta, records)
    (out_dir / "ops.md").write_text(markdown(meta, records, command))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        type=lambda s: tuple(int(float(x)) for x in s.split(",")),
        default=None,
        help="comma-separated weight sizes in elements (default 2304,65536,1048576,4194304,16777216)",
    )
    p.add_argument("--full", action="store_true", help="every size x alpha mode x dtype x pass (long)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile (listed as skipped)")
    p.add_argument("--compile", action="store_true", help="include torch.compile even with --quick")
    p.add_argument(
        "--slow-max-numel",
        type=int,
        default=None,
        help="largest size for the pure-PyTorch backend on CPU (default 1048576; GPU: no limit)",
    )
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per CPU measurement")


def options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``run`` from the command line."""
    compile_ = not args.no_compile and (not args.quick or args.compile)
    reason = (
        "skipped: --no-compile"
        if args.no_compile
        else "skipped: --quick leaves out torch.compile (tens of seconds of compilation); add --compile"
    )
    slow = args.slow_max_numel
    if slow is None and device.type == "cpu":
        slow = 2**20
    min_rt = args.min_run_time if args.min_run_time is not None else (0.02 if args.quick else 0.2)
    return dict(compile_=compile_, compile_reason=reason, slow_max_numel=slow, min_run_time=min_rt)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0], "tiny sizes, seconds: proves the script works")
    add_arguments(p)
    args = p.parse_args(argv)
    device, out = common.setup_run(args)
    cases = default_cases(args.sizes, full=args.full, quick=args.quick, device_type=device.type)
    meta, records = run(cases, device, **options(args, device))
    write_outputs(out, meta, records, "python benchmarks/bench_ops.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out}/ops.json and ops.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
