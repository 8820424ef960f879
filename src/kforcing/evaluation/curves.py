"""Learning curves of distillation runs: validation match rate against training minutes.

Reads the `val` records of each run's metrics.jsonl; writes a PNG and prints one JSON line with
each run's last validation figures, so a screening comparison is one command. `plot_designs`
puts whole chains of stages (k=1 -> 2 -> 4) of several student designs on one cumulative
CPU-minute axis (issue 11; docs/METHOD.md section 9 for the token-feedback design):
`python -m kforcing.evaluation.curves --chain LABEL RUN... --chain ... --out PREFIX`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
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
    ax.set_xlabel("training minutes (CPU-minutes on a CPU; validation excluded)")
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


# -- designs side by side (issue 11): chains of stages on one cumulative CPU-minute axis --------

@dataclass(frozen=True)
class CurvePoint:
    """One in-run validation of one stage of a chain, at one tau."""
    design: str
    run: str
    stage_k: int                # the window the stage trains
    minutes: float              # cumulative training minutes of the chain (CPU on a CPU)
    tau: float
    per_position: list[float]   # match rate at positions 1..eval_k (not conditioned on earlier)
    joint: float                # all eval_k positions match
    windows: int

    @property
    def eval_k(self) -> int:
        return len(self.per_position)


def _tau_of(key: str) -> float:
    """'tau1', 'tau0.7' (pushforward logs) or 'tau=1.0' (feedback logs) -> the float."""
    try:
        return float(key.removeprefix("tau").removeprefix("="))
    except ValueError:
        raise KForcingError(f"unreadable validation key '{key}': expected 'tau<value>'") from None


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise KForcingError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chain_points(design: str, run_dirs: list[str | Path]) -> list[CurvePoint]:
    """The validation points of a chain of stages (in training order) on one axis.

    A feedback stage logs `cum_cpu_min` (cumulative over its chain, the teacher cache included);
    a pushforward stage logs `minutes` from its own start, so it is shifted by the minutes of
    the chain's earlier stages (their last record)."""
    points: list[CurvePoint] = []
    offset = 0.0
    for d in run_dirs:
        recs = _records(Path(d))
        if not recs:
            raise KForcingError(f"empty metrics.jsonl in {d}")
        stage_k = max(int(r.get("k", 0)) for r in recs) or None
        first = len(points)
        for rec in recs:
            if "val" not in rec:
                continue
            cum = rec.get("cum_cpu_min")
            minutes = float(cum) if cum is not None else offset + float(rec["minutes"])
            for key, v in rec["val"].items():
                per_pos = [float(m) for m in v.get("per_position", v.get("per_pos", []))]
                if not per_pos:
                    raise KForcingError(f"{d}: validation '{key}' has no per-position match")
                points.append(CurvePoint(design, str(d), stage_k or len(per_pos),
                                         round(minutes, 3), _tau_of(key), per_pos,
                                         float(v["joint"]), int(v.get("windows", 0))))
        # a stage's closing validation may repeat one made at the same minute: keep one
        seen: dict[tuple[str, float, float], CurvePoint] = {}
        for q in points[first:]:
            seen[(q.run, q.minutes, q.tau)] = q
        points[first:] = seen.values()
        last = recs[-1]
        offset = float(last["cum_cpu_min"]) if "cum_cpu_min" in last else \
            offset + float(last["minutes"])
    return points


def point_at(points: list[CurvePoint], minutes: float, tau: float, *, position: int | None = None,
             eval_k: int | None = None, slack: float = 0.25) -> CurvePoint | None:
    """The latest point at or before `minutes` (+ `slack`: a validation due at minute m runs
    after the first step past m) at `tau` that has `position` (1-based) / window `eval_k`."""
    fit = [p for p in points if p.tau == tau and p.minutes <= minutes + slack
           and (position is None or p.eval_k >= position)
           and (eval_k is None or p.eval_k == eval_k)]
    return max(fit, key=lambda p: p.minutes) if fit else None


def series(points: list[CurvePoint], tau: float, metric: str, joint_k: int
            ) -> tuple[list[float], list[float]]:
    """x, y (%) of one design at one tau: `pos<i>` is position i's match; `joint` is the match
    of all joint_k positions (only windows of exactly joint_k)."""
    xs, ys = [], []
    for p in sorted((p for p in points if p.tau == tau), key=lambda p: p.minutes):
        if metric == "joint":
            if p.eval_k != joint_k:
                continue
            y = p.joint
        else:
            i = int(metric.removeprefix("pos"))
            if p.eval_k < i:
                continue
            y = p.per_position[i - 1]
        xs.append(p.minutes)
        ys.append(100 * y)
    return xs, ys


def plot_designs(chains: dict[str, list[CurvePoint]], out: str | Path, *,
                 taus: tuple[float, ...] = (1.0, 0.7), positions: tuple[int, ...] = (1, 2),
                 joint_k: int = 4) -> tuple[Path, Path]:
    """One panel per (metric, tau): match at each of `positions` and joint match of `joint_k`
    tokens vs cumulative CPU-minutes, one line per design. Writes <out>.png and <out>.jsonl (every
    point); returns both paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = (*(f"pos{i}" for i in positions), "joint")
    fig, axes = plt.subplots(len(metrics), len(taus), figsize=(5 * len(taus), 3.6 * len(metrics)),
                             squeeze=False)
    for r, metric in enumerate(metrics):
        for c, tau in enumerate(taus):
            ax = axes[r][c]
            for design, points in chains.items():
                xs, ys = series(points, tau, metric, joint_k)
                ax.plot(xs, ys, marker="o", markersize=3, label=design)
            what = f"joint k={joint_k}" if metric == "joint" else metric.replace("pos", "position ")
            ax.set_title(f"{what} match, tau {tau:g}")
            ax.set_xlabel("cumulative CPU-minutes of training (one thread)")
            ax.set_ylabel("match with teacher (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    png, jsonl = out.with_suffix(".png"), out.with_suffix(".jsonl")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    lines = [json.dumps({**asdict(p), "eval_k": p.eval_k}) for ps in chains.values() for p in ps]
    jsonl.write_text("".join(line + "\n" for line in lines))
    return png, jsonl


def main(argv: list[str] | None = None) -> None:
    """python -m kforcing.evaluation.curves --chain LABEL RUN [RUN ...] ... --out PREFIX"""
    p = argparse.ArgumentParser(prog="python -m kforcing.evaluation.curves",
                                description=main.__doc__)
    p.add_argument("--chain", nargs="+", action="append", required=True,
                   metavar="LABEL RUN", help="a design's label, then its stages in order")
    p.add_argument("--out", required=True, help="path without suffix: writes .png and .jsonl")
    p.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--positions", type=int, nargs="+", default=[1, 2])
    p.add_argument("--joint-k", type=int, default=4)
    args = p.parse_args(argv)
    if any(len(c) < 2 for c in args.chain):
        raise KForcingError("each --chain needs a label and at least one run directory")
    chains = {c[0]: chain_points(c[0], c[1:]) for c in args.chain}
    png, jsonl = plot_designs(chains, args.out, taus=tuple(args.taus),
                              positions=tuple(args.positions),
                              joint_k=args.joint_k)
    print(json.dumps({"png": str(png), "jsonl": str(jsonl),
                      "points": {k: len(v) for k, v in chains.items()}}))


if __name__ == "__main__":
    main()
