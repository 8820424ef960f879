"""The two benchmark plots: generated tokens/s and speedup over our AR, by batch size."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path


def series_label(r) -> str:
    """A row's plot label; r: a BenchRow or its dict."""
    d = r if isinstance(r, dict) else asdict(r)
    m = d["method"]
    # a non-default dtype is part of the series (fp32 and bf16 rows of one run plot apart)
    dtype = (d.get("machine") or {}).get("dtype", "fp32")
    tail = "" if dtype == "fp32" else f" {dtype}"
    if m in ("kforcing", "kforcing-compiled"):
        return f"{m} k={d['k']}{tail}"
    if m in ("hf-generate", "hf-assisted"):
        return f"{m} ({d['sampling']}){tail}"
    return m + tail


def plot(result, tokens_png: Path, speedup_png: Path) -> None:
    """result: a kforcing.evaluation.bench.BenchResult."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    for r in result.rows:
        series.setdefault(series_label(r), {})[r.batch_size] = r.tokens_per_s
    m = result.machine
    fewer = " (fewer at large batches)" if result.config["new_tokens_at"] else ""
    sub = (f"{result.config['params'] / 1e6:.1f}M params, {result.config['new_tokens']} new "
           f"tokens{fewer}, {m['threads']} thread(s), {m['cpu'][:40]}")
    for path, data, ylabel in ((tokens_png, series, "generated tokens / s (batch total)"),
                               (speedup_png, result.speedups(), "speedup over our AR")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, d in sorted(data.items()):
            bs = sorted(d)
            ax.plot(bs, [d[b] for b in bs], marker="o", label=label,
                    linestyle="--" if label.startswith("hf") else "-")
        ax.set_xscale("log", base=2)
        if path == tokens_png:
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(sub, fontsize=8)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
