"""Plot op benchmark results: time and GB/s vs tensor size per provider (log-log).

``python benchmarks/plot.py benchmarks/results/<device>/ops.json`` writes ``ops_time.png`` and
``ops_gbs.png`` beside the JSON. Only layerwise weight-noise records are plotted (the sizes
sweep); ``torch.clone`` is drawn dashed in every panel as the floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["plot_ops", "main"]

_MODES = (("forward", "forward"), ("backward", "backward"), ("fwd_bwd", "forward + backward"))


def _series(records: list[dict[str, Any]], dtype: str, mode: str, key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        if r["kind"] != "weight" or r["dtype"] != dtype or r["status"] != "ok" or r.get(key) is None:
            continue
        if r["provider"] == "torch.clone":
            if key == "gbs" and mode != "forward":
                continue  # clone's GB/s is not comparable to another pass's bytes model
        elif r["alpha_mode"] != "layerwise" or r["mode"] != mode:
            continue
        xs, ys = out.setdefault(r["provider"], ([], []))
        xs.append(r["numel"])
        ys.append(r[key])
    for name, (xs, ys) in out.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        out[name] = ([xs[i] for i in order], [ys[i] for i in order])
    return out


def plot_ops(json_path: Path, out_dir: Optional[Path] = None, dtype: str = "fp32") -> list[Path]:
    """Write the time and GB/s figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    meta, records = data["meta"], data["records"]
    out_dir = Path(out_dir) if out_dir else Path(json_path).parent
    written = []
    for key, ylabel, fname in (
        ("median_ms", "median time (ms)", "ops_time.png"),
        ("gbs", "effective GB/s (bytes model in ops.json)", "ops_gbs.png"),
    ):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
        for ax, (mode, title) in zip(axes, _MODES):
            for name, (xs, ys) in _series(records, dtype, mode, key).items():
                style = dict(linestyle="--", color="black") if name == "torch.clone" else dict(marker="o")
                ax.plot(xs, ys, label=name, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{title}, layerwise {dtype}")
            ax.set_xlabel("weight elements")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(ylabel)
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize="small")
        fig.suptitle(f"PNI noise op, {meta['device']}, {meta['threads']} threads, torch {meta['torch']}")
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="ops.json written by bench_ops.py / run_all.py")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args(argv)
    for path in plot_ops(args.json, dtype=args.dtype):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
