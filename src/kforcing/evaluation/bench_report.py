"""What a benchmark adds to its rows and meta beyond tokens/s: the roofline bound of each row,
the roofline section for docs/RESULTS.md, and which dtype won at each batch size."""

from __future__ import annotations

from dataclasses import asdict

from kforcing.evaluation.bench_plot import series_label
from kforcing.evaluation.roofline import (
    Calibration,
    calibrate,
    compute_bound_batch,
    decode_rate,
    dtype_of,
    fastest,
    pass_costs,
    roofline_section,
)


def decode_context(cfg) -> int:
    """The mean context while decoding: the prompt plus half the new tokens."""
    return cfg.prompt_len + cfg.new_tokens // 2


def calibrate_for(model, ks: list[int], cfg) -> Calibration:
    """Calibrate this machine in the benchmarked dtype (cfg.dtype), streaming as many bytes as
    the model's weights (a model that fits in the cache is judged against the cache)."""
    costs = pass_costs(model, ks, decode_context(cfg))
    return calibrate(cfg.dtype, working_set=costs[0].weight_params() * dtype_of(cfg.dtype).itemsize)


def add_roofline(rows: list, model, ks: list[int], cfg, cals: list[Calibration]) -> dict:
    """Each ar / ar-compiled / kforcing row's extra gets its bound and the fraction of it that
    its decode phase reached (decode_rate), the bound from the fastest of `cals` (calibrations
    taken before and after the rows: this VM's streaming rate drifts by more than the code
    moves a decoder, and the faster reading is the stricter bound). Returns the summary for
    the meta, every calibration in it."""
    costs = pass_costs(model, ks, decode_context(cfg))
    cal = fastest(cals)
    by_label = {"ar": costs[0], "ar-compiled": costs[0],
                **{f"{m} k={c.tokens_per_row}": c for c in costs[1:]
                   for m in ("kforcing", "kforcing-compiled")}}
    for r in rows:
        label = series_label({**asdict(r), "machine": {}})
        cost = by_label.get(label)
        if cost is not None:
            bound = cost.bound_tokens_per_s(r.batch_size, cal)
            r.extra.update(roofline_bound_tokens_per_s=round(bound, 1),
                           fraction_of_bound=round(decode_rate(r.extra, r.tokens_per_s) / bound,
                                                   3))
    return {"calibration": asdict(cal), "calibrations": [asdict(c) for c in cals],
            "context": decode_context(cfg),
            "methods": {c.method: {"weight_params": c.weight_params(),
                                   "compute_bound_from_batch": compute_bound_batch(c, cal)}
                        for c in costs}}


def roofline_markdown(model, ks: list[int], rows: list[dict], roofline: dict) -> str:
    """The docs/RESULTS.md section from bench rows (dicts) and the per-dtype summaries that
    add_roofline returned ({dtype: summary})."""
    cals = [Calibration(**s["calibration"]) for s in roofline.values()]
    context = next(iter(roofline.values()))["context"]
    batch_sizes = sorted({r["batch_size"] for r in rows})
    return roofline_section(model, ks, cals, batch_sizes, rows, context)


def dtype_winners(rows: list[dict]) -> dict[str, dict[str, str]]:
    """{method label: {batch size: the faster dtype and by how much}} where one run measured
    the same method at the same batch size in more than one dtype."""
    by: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        label = series_label({**r, "machine": {}})
        dtype = r.get("machine", {}).get("dtype", "fp32")
        by.setdefault((label, r["batch_size"]), {})[dtype] = r["tokens_per_s"]
    out: dict[str, dict[str, str]] = {}
    for (label, b), rates in sorted(by.items()):
        if len(rates) > 1:
            best = max(rates, key=rates.get)
            slow = min(rates.values())
            out.setdefault(label, {})[str(b)] = f"{best} ({rates[best] / slow:.2f}x)"
    return out
