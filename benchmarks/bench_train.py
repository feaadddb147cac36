"""Training-step benchmark: one PGD-7 adversarial-training step of CIFAR ResNet-20.

Variants, same architecture (``pni_fast.models.resnet20``) and same random data:
  plain              nn.Conv2d / nn.Linear, no noise
  plain-fresh-weight the plain model, but each conv/linear uses ``weight.clone()``: no noise, and
                     the layer gets a fresh non-leaf weight every forward as the noisy layers do
                     (on CPU, oneDNN convolutions measured faster that way than with the leaf
                     Parameter itself, so this is the like-for-like baseline for the noise cost)
  reference          every conv/linear swapped for ``pni_fast.reference.ReferenceNoisyConv2d`` /
                     ``ReferenceNoisyLinear`` (original PNI code: ``std().item()``, stored noise)
  pni_fast-<b>       ``resnet20(pni="layerwise")`` (NoisyConv2d / NoisyLinear on every layer) with
                     ``PNI_FAST_BACKEND=b`` for each backend that runs on the device

One step = PGD-7 (L-inf, eps 8/255, step 2/255, random start; 7 forward+backward passes w.r.t.
the input, model in train mode as in the original PNI training loop) + one forward+backward
on the adversarial batch + an SGD step. Time per step is the median over the timed steps (after
warm-up, the device synchronised around each step); peak memory is measured over one more step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the memory profiler's start/stop lines
# compile in-process: inductor's pool of compile workers would otherwise start in the background and
# compete with the timed code for the cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

__all__ = ["run", "markdown", "write_outputs", "main", "pgd_train_step"]

PNI_BACKENDS = ("cpu", "cuda", "triton", "torch")


def pgd_train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 7,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
) -> float:
    """PGD (L-inf, random start) on ``x``, then one SGD step on the adversarial batch; returns the loss."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp_(0, 1)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    opt.step()
    return loss.detach()


class _FreshWeightConv2d(nn.Conv2d):
    """A plain convolution whose weight is a fresh copy each forward (baseline, no noise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.clone(), self.bias)


class _FreshWeightLinear(nn.Linear):
    """A plain linear layer whose weight is a fresh copy each forward (baseline, no noise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.clone(), self.bias)


def _to_fresh_weight(model: nn.Module) -> nn.Module:
    """Swap nn.Conv2d / nn.Linear for the fresh-weight baselines holding the same parameters."""
    for parent in list(model.modules()):
        for _name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                child.__class__ = _FreshWeightConv2d
            elif type(child) is nn.Linear:
                child.__class__ = _FreshWeightLinear
    return model


def _to_reference(model: nn.Module, pni: str = "layerwise") -> nn.Module:
    """Swap every nn.Conv2d / nn.Linear for the reference PNI layer (alpha mode ``pni``) holding the same
    parameters."""
    from pni_fast.reference import ReferenceNoisyConv2d, ReferenceNoisyLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                new = ReferenceNoisyConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                    pni=pni,
                )
            elif type(child) is nn.Linear:
                new = ReferenceNoisyLinear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                    pni=pni,
                )
            else:
                continue
            new.weight = child.weight
            if child.bias is not None:
                new.bias = child.bias
            setattr(parent, name, new)
    return model


@contextlib.contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _variants(device: torch.device) -> list[tuple[str, Optional[Callable[[], nn.Module]], Optional[str], str]]:
    """``(name, model factory or None, PNI_FAST_BACKEND value, reason when unavailable)``."""
    try:
        from pni_fast.models import resnet20
    except Exception as exc:
        reason = f"pni_fast.models failed to import: {type(exc).__name__}: {exc}"
        names = ["plain", "plain-fresh-weight", "reference"] + [f"pni_fast-{b}" for b in PNI_BACKENDS]
        return [(n, None, None, reason) for n in names]
    out: list[tuple[str, Optional[Callable[[], nn.Module]], Optional[str], str]] = [
        ("plain", lambda: resnet20(pni=None), None, ""),
        ("plain-fresh-weight", lambda: _to_fresh_weight(resnet20(pni=None)), None, ""),
        ("reference", lambda: _to_reference(resnet20(pni=None)), None, ""),
    ]
    from pni_fast.ops import registry as backends

    for b in PNI_BACKENDS:
        try:
            backends.resolve_backend(b, device)
            reason = ""
            if b == "triton" and device.type == "cpu":
                reason = "triton on CPU runs only in the TRITON_INTERPRET=1 interpreter: not a speed measurement"
        except (RuntimeError, ValueError) as exc:
            reason = str(exc)
        out.append((f"pni_fast-{b}", (lambda: resnet20(pni="layerwise")) if not reason else None, b, reason))
    return out


def run(
    device: torch.device,
    *,
    batch: int,
    timed_steps: int,
    warmup: int,
    pgd_steps: int = 7,
    skip_torch_backend: Optional[str] = None,
    measure_memory: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Time every variant; returns ``(meta, records)``."""
    env = common.environment(device)
    meta = dict(env, benchmark="train", batch=batch, pgd_steps=pgd_steps, timed_steps=timed_steps, warmup=warmup)
    base = {k: env[k] for k in ("device", "device_slug", "torch", "cuda", "triton", "date_utc", "threads")}
    base["load_avg_1"] = env["load_avg_1_5_15"][0] if env["load_avg_1_5_15"] else None
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    records: list[dict[str, Any]] = []
    plain_ms: Optional[float] = None
    fresh_ms: Optional[float] = None
    for name, factory, backend, reason in _variants(device):
        rec: dict[str, Any] = dict(
            base,
            provider=name,
            batch=batch,
            pgd_steps=pgd_steps,
            model="resnet20",
            pni=None if name.startswith("plain") else "layerwise",
        )
        if factory is None:
            rec.update(status="unavailable", reason=reason)
        elif skip_torch_backend and name == "pni_fast-torch":
            rec.update(status="unavailable", reason=skip_torch_backend)
        else:
            try:
                with _env("PNI_FAST_BACKEND", backend):
                    torch.manual_seed(0)
                    model = factory().to(device).train()
                    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                    def step() -> Any:
                        return pgd_train_step(model, opt, x, y, steps=pgd_steps)

                    for _ in range(warmup):
                        step()
                    times = []
                    for _ in range(timed_steps):
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                        step()
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        times.append((time.perf_counter() - t0) * 1e3)
                    q = torch.tensor(times, dtype=torch.float64)
                    rec.update(
                        status="ok",
                        reason=None,
                        median_ms=statistics.median(times),
                        q20_ms=float(torch.quantile(q, 0.2)),
                        q80_ms=float(torch.quantile(q, 0.8)),
                        min_ms=min(times),
                        times_ms=times,
                        timer=f"time.perf_counter around each step, device synchronised, {timed_steps} steps",
                    )
                    if measure_memory:
                        rec["peak_mem_bytes"], rec["memory_method"] = common.peak_extra_bytes(step, device)
                    del model, opt
            except Exception as exc:  # reported, not hidden
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        if name == "plain" and rec["status"] == "ok":
            plain_ms = rec["median_ms"]
        if name == "plain-fresh-weight" and rec["status"] == "ok":
            fresh_ms = rec["median_ms"]
        if rec["status"] == "ok" and plain_ms:
            rec["overhead_vs_plain"] = rec["median_ms"] / plain_ms - 1
        if rec["status"] == "ok" and fresh_ms:
            rec["overhead_vs_fresh_weight"] = rec["median_ms"] / fresh_ms - 1
        records.append(rec)
        shown = f"{rec['median_ms']:.1f} ms/step" if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}"
        log(f"[train] {name} batch {batch}: {shown}")
    ref = next((r for r in records if r["provider"] == "reference" and r["status"] == "ok"), None)
    for r in records:
        if ref and r["status"] == "ok":
            r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
    # the load at the end includes this benchmark's own threads; compare with load_avg_1_5_15 at the start
    meta["load_avg_end_1_5_15"] = common.load_average()
    return meta, records


TRAIN_COLUMNS = [
    ("provider", "layers"),
    ("batch", "batch"),
    ("median_ms", "ms / step"),
    ("q20_ms", "q20 ms"),
    ("q80_ms", "q80 ms"),
    ("min_ms", "min ms"),
    ("overhead_pct", "overhead vs plain %"),
    ("overhead_fresh_pct", "overhead vs plain-fresh-weight %"),
    ("speedup_vs_reference", "speed-up vs ref"),
    ("peak_mem_mb", "peak MB"),
    ("note", "note"),
]


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> str:
    rows = []
    for r in records:
        row = dict(r)
        row["overhead_pct"] = 100 * r["overhead_vs_plain"] if r.get("overhead_vs_plain") is not None else None
        fresh = r.get("overhead_vs_fresh_weight")
        row["overhead_fresh_pct"] = 100 * fresh if fresh is not None else None
        row["peak_mem_mb"] = r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None else None
        row["note"] = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        rows.append(row)
    method = next((r["memory_method"] for r in records if r.get("memory_method")), "not measured")
    return "\n".join(
        [
            f"## Training step: PGD-{meta['pgd_steps']} adversarial training, CIFAR ResNet-20, {meta['device']}",
            "",
            f"Command: `{command}`  ",
            f"torch {meta['torch']}, CUDA {meta['cuda']}{common.driver_text(meta)}, triton {meta['triton']}, "
            f"{meta['threads']} threads, "
            f"{meta['date_utc']}, commit {meta['git_commit']}  ",
            f"Load average (1/5/15 min): {meta['load_avg_1_5_15']} at start, {meta.get('load_avg_end_1_5_15')} at end "
            "(the end figure includes this run's own threads)  ",
            f"Batch {meta['batch']} of random CIFAR-shaped data; median of {meta['timed_steps']} steps after "
            f"{meta['warmup']} warm-up; one step = {meta['pgd_steps']} PGD forward+backward passes + one training "
            "forward+backward + SGD. Noise on the weights of every conv and linear layer (layerwise alpha).  ",
            "`plain-fresh-weight` is the plain model with `weight.clone()` fed to each layer: no noise, but a fresh "
            "weight tensor every forward like the noisy layers (the like-for-like baseline for the cost of noise).  ",
            f"Peak memory: {method}, over one step, above the model and optimizer state already allocated.",
            "",
            common.markdown_table(rows, TRAIN_COLUMNS),
            "",
        ]
    )


def write_outputs(out_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]], command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "train.json", meta, records)
    (out_dir / "train.md").write_text(markdown(meta, records, command))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128; 2 with --quick)")
    p.add_argument("--train-steps", type=int, default=None, help="timed steps (default 10 GPU, 5 CPU)")


def options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``run`` from the command line."""
    gpu = device.type == "cuda"
    if args.quick:
        batch, steps, warmup, pgd = args.batch or 2, args.train_steps or 1, 1, 1
    else:
        batch, steps, warmup, pgd = args.batch or 128, args.train_steps or (10 if gpu else 5), 2 if gpu else 1, 7
    if batch < 1 or steps < 1:
        raise ValueError(f"--batch and --train-steps must be >= 1, got {batch} and {steps}")
    skip = (
        "skipped in --quick: the pure-PyTorch Philox backend adds seconds per step on CPU"
        if (args.quick and not gpu)
        else None
    )
    return dict(batch=batch, timed_steps=steps, warmup=warmup, pgd_steps=pgd, skip_torch_backend=skip)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.base_parser(__doc__.splitlines()[0], "batch 2, PGD-1, one step: proves the script works")
    add_arguments(p)
    args = p.parse_args(argv)
    device, out = common.setup_run(args)
    meta, records = run(device, **options(args, device))
    write_outputs(out, meta, records, "python benchmarks/bench_train.py " + " ".join(argv or sys.argv[1:]))
    print(f"wrote {out}/train.json and train.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
