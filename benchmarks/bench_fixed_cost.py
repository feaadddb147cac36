"""Per-call fixed cost of ``pni_fast.noisy_weight`` on small weights, against the original PNI math.

Small CNN layers (a 16x3x3x3 conv has 432 elements) make the op's cost a fixed per-call cost:
argument checks, backend choice, sigma, seed draw, the dispatcher, autograd. This benchmark

1. times ``pni_fast.noisy_weight(w, alpha)`` and ``pni_fast.reference.reference_noisy_weight``
   (the original code: ``std().item()`` + a stored ``normal_`` noise tensor) side by side in one
   process, forward and forward+backward, interleaved in rounds; the ratio is
   reference time / pni_fast time per round (>= 1.0x: pni_fast is faster), median of rounds;
2. breaks pni_fast's forward into its pieces, each timed alone in a tight loop (the same calls the
   public function makes, with the same arguments): argument checks, backend resolve, sigma, finite
   check, seed draw, the raw op, the autograd wrapper (``autograd.apply(PerturbFn, ...)`` minus the
   raw op); "rest" is the total minus the pieces (Python glue between them). The backward is split
   into the raw alpha-gradient op and the rest (autograd engine), and the reference's forward into
   ``std().item()``, the ``normal_`` draw and the autograd-recorded combine.

Layerwise alpha (one element), fp32, weights and alpha requiring grad as in training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, loops  # noqa: E402

__all__ = ["SIZES", "fixed_shape", "run", "markdown", "write_outputs", "add_arguments", "options", "main"]

SIZES = (432, 2304, 9216, 36864)
QUICK_SIZES = (432,)
# Real conv weight shapes: CIFAR ResNet's stem (16x3x3x3) and its three stages' 3x3 convs.
SHAPES = {432: (16, 3, 3, 3), 2304: (16, 16, 3, 3), 9216: (32, 32, 3, 3), 36864: (64, 64, 3, 3)}
MODES = ("forward", "fwd_bwd")


def fixed_shape(numel: int) -> tuple[int, ...]:
    """The conv shape of a benchmark size (other sizes: ``bench_ops.weight_shape``)."""
    if numel in SHAPES:
        return SHAPES[numel]
    from benchmarks.bench_ops import weight_shape

    return weight_shape(numel)


def _sync_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _inputs(numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(numel)
    w = (torch.randn(fixed_shape(numel), generator=gen) * 0.1).to(device).requires_grad_(True)
    a = torch.full((1,), 0.25, device=device, requires_grad=True)
    g = torch.randn(w.shape, generator=gen).to(device)
    return w, a, g


def _public_fns(w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> dict[str, dict[str, Callable[[], Any]]]:
    import pni_fast
    from pni_fast.reference import reference_noisy_weight

    def fwd_bwd(f: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(f(w, a), (w, a), g)

    return {
        "forward": {"pni_fast": lambda: pni_fast.noisy_weight(w, a), "reference": lambda: reference_noisy_weight(w, a)},
        "fwd_bwd": {"pni_fast": fwd_bwd(pni_fast.noisy_weight), "reference": fwd_bwd(reference_noisy_weight)},
    }


# (group, piece, code) in table order; "rest" rows are derived. "pni_fast" is what users call (the eager fast
# path on CPU: one C++ op with a C++ autograd node); the "general path" rows are the same call with
# pni_fast.fused.ENABLED = False (separate ops, Python autograd: what runs under torch.compile / torch.func
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
    ("pni_fast forward", "argument checks", "_check_tensor + _check_alpha + _weight_inner"),
    ("pni_fast forward", "backend resolve", "_backend_for(None, device_type)"),
    ("pni_fast forward", "sigma", "weight_sigma(w)"),
    ("pni_fast forward", "finite check", "_check_finite(sigma, 'weight', (alpha,))"),
    ("pni_fast forward", "seed draw", "rng.rng_args(None, 0, device, quads) (draw_seed + checks)"),
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


def _piece_fns(w: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> tuple[dict[tuple[str, str], Callable], str]:
    """The timed callables of the breakdown, keyed by (group, piece); also the backend chosen."""
    import pni_fast
    from pni_fast import autograd as pag
    from pni_fast import functional as F
    from pni_fast import fused, rng
    from pni_fast.backends import REGISTRY
    from pni_fast.reference import reference_noisy_weight

    dev_type = w.device.type
    chosen = F._backend_for(None, dev_type)
    be = REGISTRY[chosen]
    perturb_op = getattr(torch.ops.pni_fast, be.perturb).default
    grad_op = getattr(torch.ops.pni_fast, be.alpha_grad).default
    wd, ad = w.detach(), a.detach()
    sigma = F.weight_sigma(w)
    inner = F._weight_inner(w, a)
    quads = F._quads(w.numel())
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
        F._check_tensor("weight", w)
        F._check_alpha(a, w, "weight")
        F._weight_inner(w, a)

    def ref_std() -> float:
        with torch.no_grad():
            return w.std().item()

    def ref_noise() -> torch.Tensor:
        with torch.no_grad():
            return w.clone().normal_(0, std)

    fns = {
        ("pni_fast forward", "argument checks"): checks,
        ("pni_fast forward", "backend resolve"): lambda: F._backend_for(None, dev_type),
        ("pni_fast forward", "sigma"): lambda: F.weight_sigma(w),
        ("pni_fast forward", "finite check"): lambda: F._check_finite(sigma, "weight", (a,)),
        ("pni_fast forward", "seed draw"): lambda: rng.rng_args(None, 0, w.device, quads),
        ("pni_fast forward", "  of which draw_seed"): rng.draw_seed,
        ("pni_fast forward", "op"): lambda: perturb_op(wd, ad, sigma, seed, 0, inner),
        ("pni_fast forward", "  of which kernel"): below_autograd,
        ("pni_fast forward", "autograd+op"): lambda: pag.apply(
            pag.PerturbFn, w, a, sigma, seed, 0, inner, None, chosen
        ),
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


def _breakdown(
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


def run(
    device: torch.device,
    *,
    sizes: tuple[int, ...] = SIZES,
    rounds: int = 9,
    target_s: float = 0.02,
    blocks: int = 7,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Side-by-side ratios and the per-piece breakdown at every size; returns ``(meta, records)``."""
    env = common.environment(device)
    meta = dict(
        env,
        benchmark="fixed_cost",
        sizes=list(sizes),
        rounds=rounds,
        block_target_s=target_s,
        breakdown_blocks=blocks,
        alpha="layerwise",
        dtype="fp32",
        ratio="reference time / pni_fast time per round, median of rounds (>= 1: pni_fast faster)",
    )
    base = {k: env[k] for k in ("device", "device_slug", "torch", "threads")}
    sync = _sync_for(device)
    records: list[dict[str, Any]] = []
    for numel in sizes:
        w, a, g = _inputs(numel, device)
        shape = list(w.shape)
        for mode, fns in _public_fns(w, a, g).items():
            rec: dict[str, Any] = dict(base, kind="compare", numel=numel, shape=shape, mode=mode)
            try:
                times, cpu, ns = loops.interleaved(fns, rounds=rounds, target_s=target_s, sync=sync)
                ratio = loops.ratio_summary(times["reference"], times["pni_fast"])
                cpu_ratio = loops.ratio_summary(cpu["reference"], cpu["pni_fast"])
                for name in fns:
                    rec[f"{name}_us"] = statistics.median(times[name]) * 1e6
                    rec[f"{name}_cpu_us"] = statistics.median(cpu[name]) * 1e6
                    rec[f"{name}_rounds_us"] = [t * 1e6 for t in times[name]]
                    rec[f"{name}_rounds_cpu_us"] = [t * 1e6 for t in cpu[name]]
                    rec[f"{name}_calls_per_block"] = ns[name]
                rec.update(
                    status="ok",
                    ratio=ratio["median"],
                    ratio_min=ratio["min"],
                    ratio_max=ratio["max"],
                    cpu_ratio=cpu_ratio["median"],
                    cpu_ratio_min=cpu_ratio["min"],
                    cpu_ratio_max=cpu_ratio["max"],
                )
                log(
                    f"[fixed] {numel:>6} {mode:<8} pni_fast {rec['pni_fast_us']:8.2f} us  reference "
                    f"{rec['reference_us']:8.2f} us  ratio {rec['ratio']:.2f}x (CPU time: {rec['pni_fast_cpu_us']:.2f} "
                    f"vs {rec['reference_cpu_us']:.2f} us, {rec['cpu_ratio']:.2f}x)"
                )
            except Exception as exc:  # reported, not hidden
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
                log(f"[fixed] {numel} {mode}: {rec['reason']}")
            records.append(rec)
        try:
            fns, backend = _piece_fns(w, a, g)
            pieces = _breakdown(fns, blocks, target_s, sync)
            for group, piece, code in PIECES:
                stats = pieces[(group, piece)]
                records.append(
                    dict(
                        base,
                        kind="breakdown",
                        numel=numel,
                        shape=shape,
                        group=group,
                        piece=piece,
                        code=code,
                        backend=backend,
                        status="ok",
                        **stats,
                    )
                )
            f = pieces[("pni_fast", "forward total")]
            log(
                f"[fixed] {numel:>6} breakdown: pni_fast forward {f['median_us']:.2f} us wall, "
                f"{f['cpu_median_us']:.2f} us CPU, backend {backend}"
            )
        except Exception as exc:
            records.append(
                dict(
                    base,
                    kind="breakdown",
                    numel=numel,
                    shape=shape,
                    status="error",
                    reason=f"{type(exc).__name__}: {exc}"[:300],
                )
            )
            log(f"[fixed] {numel} breakdown: {records[-1]['reason']}")
    meta["load_avg_end_1_5_15"] = common.load_average()
    return meta, records


def _spread(r: dict[str, Any], key: str) -> Optional[str]:
    return f"{r[key + '_min']:.2f}-{r[key + '_max']:.2f}" if r["status"] == "ok" else r.get("reason")


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    comp = [
        dict(
            r, shape_text="x".join(map(str, r["shape"])), spread=_spread(r, "ratio"), cpu_spread=_spread(r, "cpu_ratio")
        )
        for r in records
        if r["kind"] == "compare"
    ]
    sizes = list(meta["sizes"])
    pieces = {
        (r["numel"], r["group"], r["piece"]): r for r in records if r["kind"] == "breakdown" and r["status"] == "ok"
    }
    backend = next((r["backend"] for r in records if r["kind"] == "breakdown" and r.get("backend")), "-")

    def table(stat: str) -> str:
        rows = []
        for group, piece, code in PIECES:
            row: dict[str, Any] = {"group": group, "piece": piece, "code": f"`{code}`"}
            for n in sizes:
                r = pieces.get((n, group, piece))
                row[str(n)] = r[stat] if r else None
            rows.append(row)
        cols = [("group", "part"), ("piece", "piece")] + [(str(n), f"{n} el. us") for n in sizes]
        return common.markdown_table(rows, cols + [("code", "what is timed")])

    errors = [f"- {r['numel']}: {r['reason']}" for r in records if r["kind"] == "breakdown" and r["status"] != "ok"]
    lines = [
        f"## Per-call fixed cost of `noisy_weight`, {meta['device']}",
        "",
        f"Command: `{command}`  ",
        f"torch {meta['torch']}, CUDA {meta['cuda']}{common.driver_text(meta)}, {meta['threads']} threads, "
        f"{meta['date_utc']}, commit {meta['git_commit']}  ",
        f"Load average (1/5/15 min): {meta['load_avg_1_5_15']} at start, {meta.get('load_avg_end_1_5_15')} at end "
        f"({meta['cpu_count']} CPUs)  ",
        "Layerwise alpha, fp32, weight and alpha require grad. pni_fast and the reference "
        "(`std().item()` + stored `normal_`) run side by side in one process, interleaved in "
        f"{meta['rounds']} rounds (order rotated each round; a block of calls lasts "
        f"~{meta['block_target_s'] * 1e3:.0f} ms). "
        "**Ratio = reference / pni_fast per round, median of rounds: >= 1.0x means pni_fast is faster.** "
        "Wall time is what a caller waits; CPU time (`time.process_time`) leaves out the time this process "
        "waited for a core, so it is the figure to trust when the load average is high.",
        "",
        common.markdown_table(
            comp,
            [
                ("numel", "elements"),
                ("shape_text", "shape"),
                ("mode", "pass"),
                ("pni_fast_us", "pni_fast us"),
                ("reference_us", "reference us"),
                ("ratio", "ratio (x)"),
                ("spread", "ratio min-max"),
                ("pni_fast_cpu_us", "pni_fast CPU us"),
                ("reference_cpu_us", "reference CPU us"),
                ("cpu_ratio", "CPU-time ratio (x)"),
                ("cpu_spread", "CPU ratio min-max"),
            ],
        ),
        "",
        f"### Where the time goes: CPU time, us per call (median of {meta['breakdown_blocks']} tight-loop blocks, "
        f"pieces interleaved; backend {backend})",
        "",
        "Each piece is timed alone with the arguments the public function passes it. `autograd` = "
        "`autograd.apply(PerturbFn, ...)` minus the raw op; `rest` = total minus the pieces (for the "
        "forward: glue between them); backward total = forward+backward minus forward. Derived rows can be "
        "slightly negative from timing noise.",
        "",
        table("cpu_median_us"),
        "",
        "### The same, wall time (us per call, median of blocks)",
        "",
        table("median_us"),
        "",
    ]
    if errors:
        lines += ["Breakdown errors:", *errors, ""]
    return "\n".join(lines)


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "fixed_cost.json", meta, records)
    (out_dir / "fixed_cost.md").write_text(markdown(meta, records, command))


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(float(x)) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fixed-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"--fixed-sizes must be >= 2 elements each, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fixed-sizes",
        type=_sizes,
        default=None,
        help="weight sizes for the fixed-cost benchmark (default 432,2304,9216,36864; 432 with --quick)",
    )
    p.add_argument("--fixed-rounds", type=int, default=None, help="side-by-side rounds (default 9; 2 with --quick)")


def options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rounds = args.fixed_rounds or (2 if args.quick else 9)
    if rounds < 1:
        raise ValueError(f"--fixed-rounds must be >= 1, got {rounds}")
    return dict(
        sizes=args.fixed_sizes or (QUICK_SIZES if args.quick else SIZES),
        rounds=rounds,
        target_s=0.002 if args.quick else 0.02,
        blocks=2 if args.quick else 7,
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0], "432 elements, 2 rounds, short blocks: proves the script works")
    add_arguments(p)
    args = p.parse_args(argv)
    device, out = common.setup_run(args)
    meta, records = run(device, **options(args, device))
    write_outputs(out, meta, records, "python benchmarks/bench_fixed_cost.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out}/fixed_cost.json and fixed_cost.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
