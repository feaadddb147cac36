"""The fixed-cost benchmark's breakdown: what each piece of a ``noisy_weight`` call is (``PIECES``), the
timed callables that reproduce it (the same calls the public function makes, with the same arguments),
and the derived rows (autograd, rest, backward) computed from the timed ones.

Split from ``bench_fixed_cost.py`` (the side-by-side run and the command line) because it mirrors the
internals of ``pni_fast.functional``: when those change, this is the file to update.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import loops

__all__ = ["PIECES", "piece_fns", "breakdown"]

# (group, piece, code) in table order; "rest" rows are derived. "pni_fast" is what users call (the eager fast
# path on CPU: one C++ op with a C++ autograd node); the "general path" rows are the same call with
# pni_fast.ops.fast_path.ENABLED = False (separate ops, Python autograd: what runs under torch.compile / torch.func
# and on GPU), broken into its pieces.
PIECES = [
    ("pni_fast", "forward total", "pni_fast.noisy_weight(w, a) (w, a require grad)"),
    (
        "pni_fast",
        "  of which fused op, no grad",
        "torch.ops.pni_fast.noisy(w, a, ...) on detached w, a (fast path only)",
    ),
    ("pni_fast", "  of which Python", "forward total minus the fused op with its autograd node (checks, dispatch)"),
    ("pni_fast", "backward total", "autograd.grad(noisy_weight(w, a), (w, a), g) minus forward total"),
    ("pni_fast forward", "argument checks", "checked_weight_inner(w, a) (memoized by shape, dtype, device)"),
    ("pni_fast forward", "backend resolve", "backend_for(None, device_type)"),
    ("pni_fast forward", "sigma", "weight_sigma(w)"),
    ("pni_fast forward", "finite check", "_check_finite(sigma, 'weight', (alpha,))"),
    ("pni_fast forward", "seed draw", "rng.rng_args(None, 0, device, numel) (draw_seed + checks)"),
    ("pni_fast forward", "  of which draw_seed", "rng.draw_seed()"),
    ("pni_fast forward", "op", "torch.ops.pni_fast.<perturb>.default(w, a, sigma, seed, 0, inner), no grad"),
    ("pni_fast forward", "  of which kernel", "the same op below the Autograd key (no Python autograd kernel)"),
    ("pni_fast forward", "autograd", "autograd.apply(PerturbFn, ...) on grad-requiring w, a minus op"),
    ("pni_fast forward", "rest", "total minus the pieces above (glue)"),
    ("pni_fast forward", "total", "pni_fast.noisy_weight(w, a) with the fast path off (general path)"),
    ("pni_fast backward", "alpha_grad op", "torch.ops.pni_fast.<alpha_grad>.default(g, a, sigma, seed, 0, inner)"),
    ("pni_fast backward", "rest", "backward total minus alpha_grad op (autograd engine, glue)"),
    ("pni_fast backward", "total", "the same for the general path's forward+backward"),
    ("reference forward", "std().item()", "w.std().item()"),
    ("reference forward", "noise", "w.clone().normal_(0, std)"),
    ("reference forward", "combine", "w + alpha * noise (autograd recorded)"),
    ("reference forward", "rest", "total minus the pieces above"),
    ("reference forward", "total", "reference_noisy_weight(w, a)"),
]


def piece_fns(w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> tuple[dict[tuple[str, str], Callable], str]:
    """The timed callables of the breakdown, keyed by (group, piece); also the backend chosen."""
    import pni_fast
    from pni_fast import functional as F
    from pni_fast import rng
    from pni_fast.ops import fast_path as fused
    from pni_fast.ops.autograd import PerturbFn
    from pni_fast.ops.call import apply
    from pni_fast.ops.dispatch import backend_for
    from pni_fast.ops.registry import REGISTRY
    from pni_fast.reference import reference_noisy_weight

    dev_type = w.device.type
    chosen = backend_for(None, dev_type)
    be = REGISTRY[chosen]
    perturb_op = getattr(torch.ops.pni_fast, be.perturb).default
    grad_op = getattr(torch.ops.pni_fast, be.alpha_grad).default
    wd, ad = w.detach(), a.detach()
    sigma = pni_fast.weight_sigma(w)
    inner = F._weight_inner(w, a)
    seed = 12345
    std = w.detach().std().item()
    noise = w.detach().clone().normal_(0, std)

    def below_autograd() -> torch.Tensor:
        with torch._C._AutoDispatchBelowAutograd():
            return perturb_op(wd, ad, sigma, seed, 0, inner)

    def general(fn: Callable) -> Callable:
        def run():
            fused.ENABLED = False
            try:
                return fn()
            finally:
                fused.ENABLED = True

        return run

    def fused_op(wt: torch.Tensor, at: torch.Tensor) -> Callable:
        if not fused.usable(chosen, wt, None):
            return lambda: float("nan")  # no fast path here (GPU, another backend): reported as nan
        op = torch.ops.pni_fast.noisy.default
        return lambda: op(wt, at, 0, inner, None, None, "weight")

    def checks() -> None:
        F.checked_weight_inner(w, a)

    def ref_std() -> float:
        with torch.no_grad():
            return w.std().item()

    def ref_noise() -> torch.Tensor:
        with torch.no_grad():
            return w.clone().normal_(0, std)

    fns = {
        ("pni_fast forward", "argument checks"): checks,
        ("pni_fast forward", "backend resolve"): lambda: backend_for(None, dev_type),
        ("pni_fast forward", "sigma"): lambda: pni_fast.weight_sigma(w),
        ("pni_fast forward", "finite check"): lambda: F._check_finite(sigma, "weight", (a,)),
        ("pni_fast forward", "seed draw"): lambda: rng.rng_args(None, 0, w.device, w.numel()),
        ("pni_fast forward", "  of which draw_seed"): rng.draw_seed,
        ("pni_fast forward", "op"): lambda: perturb_op(wd, ad, sigma, seed, 0, inner),
        ("pni_fast forward", "  of which kernel"): below_autograd,
        ("pni_fast forward", "autograd+op"): lambda: apply(PerturbFn, w, a, sigma, seed, 0, inner, None, chosen),
        ("pni_fast", "forward total"): lambda: pni_fast.noisy_weight(w, a),
        ("pni_fast", "fwd_bwd"): lambda: torch.autograd.grad(pni_fast.noisy_weight(w, a), (w, a), g),
        ("pni_fast", "fused op, grad"): fused_op(w, a),
        ("pni_fast", "  of which fused op, no grad"): fused_op(wd, ad),
        ("pni_fast forward", "total"): general(lambda: pni_fast.noisy_weight(w, a)),
        ("pni_fast fwd_bwd", "total"): general(lambda: torch.autograd.grad(pni_fast.noisy_weight(w, a), (w, a), g)),
        ("pni_fast backward", "alpha_grad op"): lambda: grad_op(g, ad, sigma, seed, 0, inner),
        ("reference forward", "std().item()"): ref_std,
        ("reference forward", "noise"): ref_noise,
        ("reference forward", "combine"): lambda: w + a * noise,
        ("reference forward", "total"): lambda: reference_noisy_weight(w, a),
    }
    return fns, f"{chosen} ({be.perturb}, {be.alpha_grad})"


def breakdown(
    fns: dict[tuple[str, str], Callable], blocks: int, target_s: float, sync: Callable[[], None]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Time the pieces interleaved (one block each per round, ``blocks`` rounds, so a load drift hits all
    alike), then derive autograd / rest / backward rows (medians in us, wall and CPU)."""
    wall, cpu, ns = loops.interleaved(fns, rounds=blocks, target_s=target_s, sync=sync)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key in fns:
        out[key] = loops.summarize(wall[key], ns[key], scale=1e6, unit="us")
        out[key].update(cpu_median_us=statistics.median(cpu[key]) * 1e6, cpu_min_us=min(cpu[key]) * 1e6)
    fwd, ref, bwd, fast = "pni_fast forward", "reference forward", "pni_fast backward", "pni_fast"
    parts = ["argument checks", "backend resolve", "sigma", "finite check", "seed draw", "autograd+op"]
    formulas: dict[tuple[str, str], Callable[[Callable[[str, str], float]], float]] = {
        (fwd, "autograd"): lambda m: m(fwd, "autograd+op") - m(fwd, "op"),
        (fwd, "rest"): lambda m: m(fwd, "total") - sum(m(fwd, p) for p in parts),
        (bwd, "total"): lambda m: m("pni_fast fwd_bwd", "total") - m(fwd, "total"),
        (bwd, "rest"): lambda m: m("pni_fast fwd_bwd", "total") - m(fwd, "total") - m(bwd, "alpha_grad op"),
        (ref, "rest"): lambda m: m(ref, "total") - sum(m(ref, p) for p in ("std().item()", "noise", "combine")),
        (fast, "  of which Python"): lambda m: m(fast, "forward total") - m(fast, "fused op, grad"),
        (fast, "backward total"): lambda m: m(fast, "fwd_bwd") - m(fast, "forward total"),
    }
    derived = {}
    for key, f in formulas.items():
        derived[key] = {"derived": True}
        for stat in ("median_us", "cpu_median_us"):
            derived[key][stat] = f(lambda g, p, stat=stat: out[(g, p)][stat])
    out.update(derived)
    return out
