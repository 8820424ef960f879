"""Learning curves of distillation runs: validation match rate against wall-clock minutes.

Reads the `val` records of each run's metrics.jsonl; writes a PNG and prints one JSON line with
each run's last validation figures, so a screening comparison is one command.
"""

from __future__ import annotations

import json
from pathlib import Path

from kforcing.errors import KForcingError


def read_curve(run_dir: str | Path, tau: str = "tau1", metric: str = "first"
               ) -> tuple[list[float], list[float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise KForcingError(f"no metrics.jsonl in {run_dir}")
    minutes, values = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        val = rec.get("val", {}).get(tau)
        if val is not None:
            minutes.append(rec["minutes"])
            values.append(val[metric])
    return minutes, values


def summarize(run_dirs: list[str | Path]) -> dict:
    out = {}
    for d in run_dirs:
        lines = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        vals = [r for r in lines if "val" in r]
        if vals:
            out[Path(d).name] = {"minutes": vals[-1]["minutes"], "step": vals[-1]["step"],
                                 **vals[-1]["val"]}
    return out


def plot_curves(run_dirs: list[str | Path], out: str | Path, *, tau: str = "tau1",
                metric: str = "first", title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for d in run_dirs:
        xs, ys = read_curve(d, tau, metric)
        ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=Path(d).name)
    ax.set_xlabel("wall-clock minutes of training (validation time excluded)")
    ax.set_ylabel(f"{metric} match with teacher (%), {tau}")
    ax.set_title(title or f"K-Forcing distillation: {metric} match vs time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
