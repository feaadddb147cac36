"""Whole-model step: CIFAR ResNet-20 with and without PNI, side by side in rounds.

Models (same architecture, ``pni_fast.models.resnet20``, channelwise alpha where there is noise):
  plain               no noise
  plain-fresh-weight  plain, each conv/linear fed ``weight.clone()`` (a fresh non-leaf weight every
                      forward like the noisy layers; see bench_train.py)
  reference           every conv/linear is the original PNI layer (``std().item()`` + stored noise)
  pni_fast            ``resnet20(pni="channelwise")`` as users get it: whole-model batching (one
                      multi-tensor call per forward, one alpha-gradient call per backward) through the
                      eager fast path (``pni_fast::noisy_multi``: one C++ op with a C++ autograd node)
  pni_fast-general    the same model with the fast path off (``pni_fast.ops.fast_path.ENABLED = False`` during
                      its blocks): sigma, checks, seed and the multi-tensor op as separate steps with
                      Python autograd, as under torch.compile / torch.func
  pni_fast-per-layer  ``convert(..., batch_noise=False)``: one ``noisy_weight`` call per layer

Scenarios (each with its own thread count; CPU figures depend on it):
  fwd_bwd    batch 1, 1 thread: forward + cross-entropy + backward (+ zero_grad): where the per-call
             fixed cost of the 20 noisy layers shows most
  pgd_train  batch 16, 2 threads: one PGD-7 adversarial-training step (bench_train.pgd_train_step)

Within a scenario the models run interleaved: each round times every model once (order rotated),
and a model's ratio to plain is its time / plain's time in the same round; the table gives the
median over rounds (wall time, and CPU time of the process as the load-robust complement).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, loops  # noqa: E402
from benchmarks.bench_train import _to_fresh_weight, _to_reference, pgd_train_step  # noqa: E402

__all__ = ["MODELS", "SCENARIOS", "build_model", "run", "markdown", "write_outputs", "add_arguments", "options", "main"]

MODELS = ("plain", "plain-fresh-weight", "reference", "pni_fast", "pni_fast-general", "pni_fast-per-layer")
PNI = "channelwise"
# name -> (batch, threads, pgd steps (None: plain forward+backward), rounds, block seconds)
SCENARIOS: dict[str, dict[str, Any]] = {
    "fwd_bwd": dict(batch=1, threads=1, pgd_steps=None, rounds=15, target_s=0.1),
    "pgd_train": dict(batch=16, threads=2, pgd_steps=7, rounds=9, target_s=0.2),
}
# --quick proves the code path only: one round, and 1 thread (two OpenMP threads on a loaded 2-core
# machine can take ten times longer, which a smoke test does not need)
QUICK_SCENARIOS: dict[str, dict[str, Any]] = {
    "fwd_bwd": dict(batch=1, threads=1, pgd_steps=None, rounds=1, target_s=0.001),
    "pgd_train": dict(batch=2, threads=1, pgd_steps=1, rounds=1, target_s=0.001),
}


def build_model(name: str, device: torch.device) -> tuple[nn.Module, Any]:
    """``(model, handle)``: the model in train mode on ``device``; ``handle`` keeps batching hooks alive."""
    import pni_fast
    from pni_fast.models import resnet20

    torch.manual_seed(0)
    handle = None
    if name == "plain":
        model = resnet20()
    elif name == "plain-fresh-weight":
        model = _to_fresh_weight(resnet20())
    elif name == "reference":
        model = _to_reference(resnet20(), pni=PNI)
    elif name in ("pni_fast", "pni_fast-general"):
        model = resnet20(pni=PNI)
        handle = pni_fast.batch_weight_noise(model)  # installed by resnet20 already: returns that handle
    elif name == "pni_fast-per-layer":
        model = pni_fast.convert(resnet20(), pni=PNI, batch_noise=False)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return model.to(device).train(), handle


def _general_path(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with pni_fast's eager fast path switched off while it runs."""
    from pni_fast.ops import fast_path as fused

    def run() -> Any:
        fused.ENABLED = False
        try:
            return fn()
        finally:
            fused.ENABLED = True

    return run


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pgd_steps: Optional[int]) -> Callable[[], Any]:
    if pgd_steps is None:

        def fwd_bwd() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return fwd_bwd
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return lambda: pgd_train_step(model, opt, x, y, steps=pgd_steps)


def run(
    device: torch.device,
    *,
    scenarios: dict[str, dict[str, Any]],
    models: tuple[str, ...] = MODELS,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every scenario, models interleaved in rounds; returns ``(meta, records)``."""
    env = common.environment(device)
    meta = dict(
        env,
        benchmark="model_step",
        model="resnet20",
        pni=PNI,
        models=list(models),
        scenarios=scenarios,
        ratio_to_plain="time / plain time in the same round, median of rounds (> 1: slower than plain)",
        speedup_vs_reference="reference time / this time in the same round, median of rounds "
        "(>= 1: faster than the reference layers)",
    )
    base = {k: env[k] for k in ("device", "device_slug", "torch", "cuda")}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    old_threads = torch.get_num_threads()
    records: list[dict[str, Any]] = []
    try:
        for scen, cfg in scenarios.items():
            torch.set_num_threads(cfg["threads"])
            gen = torch.Generator().manual_seed(0)
            x = torch.rand(cfg["batch"], 3, 32, 32, generator=gen).to(device)
            y = torch.randint(0, 10, (cfg["batch"],), generator=gen).to(device)
            fns, errors, keep = {}, {}, []
            for name in models:
                try:
                    model, handle = build_model(name, device)
                    fns[name] = _step_fn(model, x, y, cfg["pgd_steps"])
                    if name == "pni_fast-general":
                        fns[name] = _general_path(fns[name])
                    keep.append(handle)  # the batching hooks stay registered while the scenario runs
                except Exception as exc:  # reported, not hidden
                    errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            load = common.load_average()
            log(f"[model] {scen}: batch {cfg['batch']}, {cfg['threads']} threads, {cfg['rounds']} rounds, load {load}")
            try:
                wall, cpu, ns = loops.interleaved(fns, rounds=cfg["rounds"], target_s=cfg["target_s"], sync=sync)
            except Exception as exc:
                wall, cpu, ns = {}, {}, {}
                errors.update({n: f"{type(exc).__name__}: {exc}"[:300] for n in fns})
            for name in models:
                rec: dict[str, Any] = dict(
                    base,
                    scenario=scen,
                    model=name,
                    batch=cfg["batch"],
                    threads=cfg["threads"],
                    pgd_steps=cfg["pgd_steps"],
                    rounds=cfg["rounds"],
                    load_avg_1_5_15=load,
                )
                if name in errors or name not in wall:
                    rec.update(status="error", reason=errors.get(name, "not measured"))
                    records.append(rec)
                    continue
                rec.update(
                    status="ok",
                    median_ms=statistics.median(wall[name]) * 1e3,
                    min_ms=min(wall[name]) * 1e3,
                    cpu_median_ms=statistics.median(cpu[name]) * 1e3,
                    rounds_ms=[t * 1e3 for t in wall[name]],
                    rounds_cpu_ms=[t * 1e3 for t in cpu[name]],
                    calls_per_block=ns[name],
                )
                for key, ref, this_over in (("to_plain", "plain", True), ("vs_reference", "reference", False)):
                    if ref not in wall:
                        continue
                    for clock, times in (("", wall), ("cpu_", cpu)):
                        num, den = (times[name], times[ref]) if this_over else (times[ref], times[name])
                        r = loops.ratio_summary(num, den)
                        rec[f"{clock}ratio_{key}"] = r["median"]
                        rec[f"{clock}ratio_{key}_min"], rec[f"{clock}ratio_{key}_max"] = r["min"], r["max"]
                records.append(rec)
                nan = float("nan")
                log(
                    f"[model] {scen} {name:<18} {rec['median_ms']:9.2f} ms  x plain "
                    f"{rec.get('ratio_to_plain', nan):.3f} (CPU {rec.get('cpu_ratio_to_plain', nan):.3f})"
                )
    finally:
        torch.set_num_threads(old_threads)
    meta["load_avg_end_1_5_15"] = common.load_average()
    return meta, records


COLUMNS = [
    ("scenario", "scenario"),
    ("model", "model"),
    ("median_ms", "ms / step"),
    ("min_ms", "min ms"),
    ("ratio_to_plain", "x plain"),
    ("plain_spread", "x plain min-max"),
    ("ratio_vs_reference", "speed-up vs reference"),
    ("cpu_median_ms", "CPU ms / step"),
    ("cpu_ratio_to_plain", "CPU x plain"),
    ("cpu_ratio_vs_reference", "CPU speed-up vs reference"),
    ("note", "note"),
]


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    rows = []
    for r in records:
        row = dict(r, note="" if r["status"] == "ok" else f"{r['status']}: {r['reason']}")
        if r.get("ratio_to_plain_min") is not None:
            row["plain_spread"] = f"{r['ratio_to_plain_min']:.3f}-{r['ratio_to_plain_max']:.3f}"
        rows.append(row)
    scen_lines = []
    for name, cfg in meta["scenarios"].items():
        what = (
            "forward + backward"
            if cfg["pgd_steps"] is None
            else (
                f"PGD-{cfg['pgd_steps']} adversarial-training step ({cfg['pgd_steps']} forward+backward passes w.r.t. "
                "the input, one training forward+backward, SGD)"
            )
        )
        loads = {str(r["load_avg_1_5_15"]) for r in records if r["scenario"] == name}
        scen_lines.append(
            f"- `{name}`: {what}, batch {cfg['batch']}, {cfg['threads']} thread(s), median of "
            f"{cfg['rounds']} rounds; load average at its start {', '.join(sorted(loads))}"
        )
    return "\n".join(
        [
            f"## Whole-model step: CIFAR ResNet-20, {meta['device']}",
            "",
            f"Command: `{command}`  ",
            f"torch {meta['torch']}, CUDA {meta['cuda']}{common.driver_text(meta)}, {meta['date_utc']}, "
            f"commit {meta['git_commit']}  ",
            f"Load average (1/5/15 min): {meta['load_avg_1_5_15']} at start, {meta.get('load_avg_end_1_5_15')} at end "
            f"({meta['cpu_count']} CPUs)  ",
            f"Noise on the weights of all 20 conv/linear layers, {meta['pni']} alpha. Models interleaved in rounds "
            "(order "
            "rotated each round): **x plain = time / plain's time in the same round** (> 1: slower than plain), "
            "**speed-up vs reference = reference time / this time** (>= 1: faster than the original PNI layers); "
            "medians over rounds; `min ms` is the least disturbed round. CPU = `time.process_time` of the process "
            "(all threads): it leaves out time spent waiting for a core on a loaded machine, but counts OpenMP "
            "threads spinning while they wait for a descheduled peer (2 threads on a loaded 2-core machine).",
            "",
            *scen_lines,
            "",
            common.markdown_table(rows, COLUMNS),
            "",
        ]
    )


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "model_step.json", meta, records)
    (out_dir / "model_step.md").write_text(markdown(meta, records, command))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-rounds",
        type=int,
        default=None,
        help="rounds per whole-model scenario (default 15 fwd_bwd, 9 pgd_train; 1 with --quick)",
    )
    p.add_argument(
        "--model-threads",
        type=int,
        default=None,
        help="thread count for every whole-model scenario (default: 1 for fwd_bwd, 2 for pgd_train)",
    )


def options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    scenarios = {k: dict(v) for k, v in (QUICK_SCENARIOS if args.quick else SCENARIOS).items()}
    if args.model_rounds is not None:
        if args.model_rounds < 1:
            raise ValueError(f"--model-rounds must be >= 1, got {args.model_rounds}")
        for cfg in scenarios.values():
            cfg["rounds"] = args.model_rounds
    if args.model_threads is not None:
        if args.model_threads < 1:
            raise ValueError(f"--model-threads must be >= 1, got {args.model_threads}")
        for cfg in scenarios.values():
            cfg["threads"] = args.model_threads
    return dict(scenarios=scenarios)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0], "tiny batches, PGD-1, 2 rounds: proves the script works")
    add_arguments(p)
    args = p.parse_args(argv)
    device, out = common.setup_run(args)
    meta, records = run(device, **options(args, device))
    write_outputs(out, meta, records, "python benchmarks/bench_model.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out}/model_step.json and model_step.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
