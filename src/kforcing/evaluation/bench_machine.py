"""A quiet machine for a benchmark (docs/METHOD.md section 10).

A decode benchmark on a shared machine measures the other jobs as much as the decoder. So every
configuration records the load average and the CPU time it got (kforcing.decoding.machine,
which says when a run counts as busy), the result warns loudly when any row was busy, and
`pin_cores` pins the process to the cores it is given (sched_setaffinity), so a quiet core stays
quiet even when another core trains.
"""

from __future__ import annotations

import os

from kforcing.decoding.machine import busy_load
from kforcing.errors import KForcingError


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def parse_cores(text: str) -> list[int]:
    """'0' / '0,2' / '0-3' -> sorted core ids."""
    cores: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        cores = set()
    if not cores or min(cores) < 0:
        raise KForcingError(f"--cores expects core ids like 0 or 0,1 or 0-3, got '{text}'")
    return sorted(cores)


def pin_cores(cores: list[int]) -> list[int]:
    """Pin this process (and the threads it starts later) to `cores`; returns the new affinity."""
    have = os.cpu_count() or 1
    bad = [c for c in cores if c >= have]
    if bad:
        raise KForcingError(f"core {bad[0]} does not exist: this machine has cores 0-{have - 1}")
    if not hasattr(os, "sched_setaffinity"):
        raise KForcingError("this platform cannot pin a process to cores (no sched_setaffinity)")
    os.sched_setaffinity(0, cores)
    return usable_cores()


def busy_warning(rows: list) -> str | None:
    """One loud paragraph when any row ran on a busy machine (None when all were quiet)."""
    busy = [r for r in rows if (r.machine if hasattr(r, "machine") else r["machine"]).get("busy")]
    if not busy:
        return None
    loads = [m["load_avg_1m"] for m in (r.machine if hasattr(r, "machine") else r["machine"]
                                        for r in busy) if m.get("load_avg_1m") is not None]
    worst = f", load average up to {max(loads):.2f}" if loads else ""
    return (f"WARNING: the machine was busy during {len(busy)} of {len(rows)} benchmark rows"
            f"{worst} (quiet: < {busy_load():.2f} on {os.cpu_count()} cores). Their absolute "
            "tokens/s are not trustworthy; they are marked machine.busy = true. Rerun on a "
            "quiet machine, pinned (--cores), before quoting them.")
