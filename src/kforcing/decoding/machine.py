"""How much of the machine a timed decode got: the 1-minute load average before and after, and
the CPU time the process got for the wall time it took. A benchmark row (kforcing.evaluation.
bench) and a `k="auto"` calibration (kforcing.decoding.autok) both record it, and both distrust
a measurement taken while the machine was busy:

- the load average before the run was at least BUSY_LOAD_FRACTION of the machine's cores (on a
  2-core machine: 1.5), or after it, our own threads discounted;
- the process got less than MIN_CPU_SHARE of one core while it ran (it was preempted).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

BUSY_LOAD_FRACTION = 0.75   # load average / cores at which a run no longer counts as quiet
MIN_CPU_SHARE = 0.8         # CPU seconds per wall second below which the process was preempted


def load_avg_1m() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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
