"""How loaded the machine was while a benchmark ran (docs/METHOD.md section 10).

A decode benchmark on a shared machine measures the other jobs as much as the decoder. So every
configuration records the 1-minute load average before and after it, the CPU time the process
got against the wall time it took, and is marked busy when either says the core was shared:

- the load average before the run was at least BUSY_LOAD_FRACTION of the machine's cores (on a
  2-core machine: 1.5), or after it, our own threads discounted;
- the process got less than MIN_CPU_SHARE of one core while it ran (it was preempted).

`pin_cores` pins the process to the cores it is given (sched_setaffinity), so a quiet core stays
quiet even when another core trains.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from kforcing.errors import KForcingError

BUSY_LOAD_FRACTION = 0.75   # load average / cores at which a run no longer counts as quiet
MIN_CPU_SHARE = 0.8         # CPU seconds per wall second below which the process was preempted


def load_avg_1m() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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


def busy_load() -> float:
    """The load average from which a run is marked busy."""
    return BUSY_LOAD_FRACTION * (os.cpu_count() or 1)


@dataclass
class Usage:
    """What one configuration got from the machine."""
    load_avg_1m: float | None         # before the run
    load_avg_1m_after: float | None
    cpu_seconds: float                # process CPU time, every thread
    wall_seconds: float
    threads: int

    @property
    def cpu_share(self) -> float:
        """CPU seconds per wall second (1.0: one core all the time)."""
        return self.cpu_seconds / max(self.wall_seconds, 1e-9)

    def busy_reasons(self) -> list[str]:
        """Why this run does not count as quiet (empty: it was quiet)."""
        limit = busy_load()
        out = []
        if self.load_avg_1m is not None and self.load_avg_1m >= limit:
            out.append(f"load average {self.load_avg_1m:.2f} before the run (quiet: < {limit:.2f})")
        if (self.load_avg_1m_after is not None
                and self.load_avg_1m_after - self.threads >= limit):
            out.append(f"load average {self.load_avg_1m_after:.2f} after the run, "
                       f"{self.threads} of it ours")
        if self.wall_seconds > 0.05 and self.cpu_share < MIN_CPU_SHARE:
            out.append(f"the process got {self.cpu_share:.2f} CPU seconds per second")
        return out

    def record(self) -> dict:
        """The keys a benchmark row's `machine` gets."""
        return {"load_avg_1m": self.load_avg_1m, "load_avg_1m_after": self.load_avg_1m_after,
                "cpu_seconds": round(self.cpu_seconds, 4),
                "wall_seconds": round(self.wall_seconds, 4),
                "cpu_share": round(self.cpu_share, 3), "busy": bool(self.busy_reasons()),
                "busy_reasons": self.busy_reasons()}


class Watch:
    """Brackets one configuration: `w = Watch(threads); ...; usage = w.stop()`."""

    def __init__(self, threads: int):
        self.threads = threads
        self.load = load_avg_1m()
        self.cpu = time.process_time()
        self.wall = time.perf_counter()

    def stop(self) -> Usage:
        return Usage(self.load, load_avg_1m(), time.process_time() - self.cpu,
                     time.perf_counter() - self.wall, self.threads)


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
