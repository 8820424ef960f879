"""`kforcing bench --interleave`: at each batch size the methods take turns, one timed run each
per round, for `repeats` rounds (the order rotating), instead of every repeat of one method
before the next. This VM's speed drifts by up to 2x within minutes; taking turns makes a drift
hit every method alike, so the ratios between methods at one batch size hold where their
absolute figures do not. Each configuration's run still has its own warm-up."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable

RowFn = Callable[[object, int, int | None, list[list[int]]], object]


def interleaved_rows(bench, plan: Iterable[tuple[int, str, int | None]],
                     prompts_for: Callable[[int], list[list[int]]], row_fns: dict[str, RowFn],
                     on_row: Callable[[int, str, int | None], None] | None = None) -> list:
    """The rows of `plan` ((batch size, method, k) in order), each merged from
    bench.cfg.repeats single-run rows taken in turns with the other methods of its batch
    size."""
    one = dataclasses.replace(bench, cfg=dataclasses.replace(bench.cfg, repeats=1,
                                                             max_seconds=None))
    groups: dict[int, list[tuple[str, int | None]]] = {}
    for B, method, k in plan:
        groups.setdefault(B, []).append((method, k))
    rows = []
    for B, entries in groups.items():
        got: dict[tuple[str, int | None], list] = {e: [] for e in entries}
        for r in range(bench.cfg.repeats):
            turn = r % len(entries)
            for method, k in entries[turn:] + entries[:turn]:
                if on_row:
                    on_row(B, method, k)
                got[method, k].append(row_fns[method](one, B, k, prompts_for(B)))
        rows += [merge_rows(got[e]) for e in entries]
    return rows


def merge_rows(rows: list):
    """One BenchRow from single-run rows of the same configuration: medians over every run,
    the load before the first and after the last, CPU and wall seconds summed."""
    first, last = rows[0], rows[-1]
    rates = [x for r in rows for x in r.runs_tokens_per_s]
    lat = [r.step_latency_ms for r in rows if r.step_latency_ms is not None]
    cpu = sum(r.machine.get("cpu_seconds", 0.0) for r in rows)
    wall = sum(r.machine.get("wall_seconds", 0.0) for r in rows)
    reasons = [x for r in rows for x in r.machine.get("busy_reasons", [])]
    machine = {**last.machine, "load_avg_1m": first.machine.get("load_avg_1m"),
               "cpu_seconds": round(cpu, 4), "wall_seconds": round(wall, 4),
               "cpu_share": round(cpu / wall, 3) if wall else None,
               "busy": any(r.machine.get("busy") for r in rows),
               "busy_reasons": list(dict.fromkeys(reasons))}
    return dataclasses.replace(
        last, tokens_per_s=statistics.median(rates),
        step_latency_ms=statistics.median(lat) if lat else None, repeats=len(rates),
        runs_tokens_per_s=rates, machine=machine, extra={**last.extra, "interleaved": True})
