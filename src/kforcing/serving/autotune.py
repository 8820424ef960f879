"""`--k auto` in the server: the calibration's k per batch-size bucket, corrected by the server's
own waves.

The calibration (kforcing.decoding.autok) times the bare decoders. A served wave costs more per
forward pass than that: after every pass the scheduler streams each row's new tokens (text
decoding, stop sequences, one event per row to the event loop), so a mode that makes fewer
passes gains more in the server than in the calibration (docs/RESULTS.md measured K-Forcing at
1.6x AR through the server at concurrency 128, where the calibration had picked AR). So each
bucket keeps two arms, AR (k = 1) and one k > 1 (the calibration's pick, or max_k when it picked
AR), and the tokens/s of the recent waves each arm decoded:

- the first waves of a bucket try each arm MIN_WAVES times, the calibration's pick first;
- then the bucket decodes with the arm whose median over its last WINDOW waves is higher, AR
  unless the other beats it by MARGIN;
- the other arm is tried again EXPLORE_EVERY waves after its last wave (4 times as long when
  its median is more than CLEAR_GAP below the chosen arm's), so a change in the machine's speed
  or in the traffic is followed.

A wave's tokens/s is every token it streamed over the wall time of the whole wave (prefill,
passes and streaming), as its clients experience it.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kforcing.decoding import autok

log = logging.getLogger("kforcing.serve")

MIN_WAVES = 1        # waves per arm before the bucket exploits (a wave of many rows is long)
WINDOW = 8           # recent waves per arm the median is taken over
EXPLORE_EVERY = 16   # then the arm not chosen is tried again after this many waves
CLEAR_GAP = 0.2      # ... or after 4 times as many when it is this much slower
MARGIN = 0.05        # k > 1 must beat AR's median tokens/s by this much


@dataclass
class Bucket:
    """One batch-size bucket's arms: AR (1) and one k > 1, with their recent waves' tokens/s."""
    prior: int                                   # the calibration's k (1: AR)
    k: int                                       # the arm that is not AR
    rates: dict[int, deque] = field(default_factory=dict)
    waves: int = 0
    chosen: int | None = None                    # the arm exploitation picks now
    tried: dict[int, int] = field(default_factory=dict)   # arm -> the last wave it decoded

    def __post_init__(self):
        for arm in (1, self.k):
            self.rates.setdefault(arm, deque(maxlen=WINDOW))

    @property
    def arms(self) -> tuple[int, int]:
        """Both arms, the calibration's pick first."""
        return (self.prior, 1 if self.prior != 1 else self.k)

    def medians(self) -> dict[int, float]:
        return {arm: statistics.median(r) for arm, r in self.rates.items()}

    def best(self, med: dict[int, float]) -> int:
        return self.k if med[self.k] > (1 + MARGIN) * med[1] else 1

    def explore_now(self, best: int, med: dict[int, float]) -> bool:
        """Whether the arm not chosen is due for another wave."""
        other = self.k if best == 1 else 1
        period = EXPLORE_EVERY * (4 if med[other] < (1 - CLEAR_GAP) * med[best] else 1)
        return self.waves - self.tried.get(other, 0) >= period

    def summary(self) -> dict:
        return {"calibrated": self.prior, "chosen": self.chosen, "waves": self.waves,
                "median_tokens_per_s": {str(a): round(statistics.median(r), 1) if r else None
                                        for a, r in self.rates.items()}}


class WaveTuner:
    """k per wave for one mode under `--k auto`. prior(bucket) -> the calibration's k;
    max_k: the other arm where the calibration picked AR."""

    def __init__(self, prior: Callable[[int], int], max_k: int, name: str = ""):
        self.prior, self.max_k, self.name = prior, max_k, name
        self.buckets: dict[int, Bucket] = {}

    def _bucket(self, batch_size: int) -> Bucket:
        b = autok.bucket(batch_size)
        if b not in self.buckets:
            p = self.prior(b)
            self.buckets[b] = Bucket(prior=p, k=p if p > 1 else self.max_k)
        return self.buckets[b]

    def choose(self, batch_size: int) -> int:
        """The k the next wave of this size decodes with (1 = AR)."""
        st = self._bucket(batch_size)
        if st.k == 1:                                # max_k 1: nothing to choose
            return 1
        st.waves += 1
        k = self._pick(st, batch_size)
        st.tried[k] = st.waves
        return k

    def _pick(self, st: Bucket, batch_size: int) -> int:
        for arm in st.arms:
            if len(st.rates[arm]) < MIN_WAVES:
                return arm
        med = st.medians()
        best = st.best(med)
        if best != st.chosen:
            log.info("--k auto%s, batch bucket %d: k=%d (median tokens/s %s)",
                     f" ({self.name})" if self.name else "", autok.bucket(batch_size), best,
                     {arm: round(m, 1) for arm, m in med.items()})
            st.chosen = best
        if st.explore_now(best, med):
            return st.k if best == 1 else 1
        return best

    def record(self, batch_size: int, k: int, tokens: int, seconds: float) -> None:
        """A wave of this size decoded with k gave `tokens` in `seconds`."""
        st = self._bucket(batch_size)
        if k in st.rates and tokens > 0 and seconds > 0:
            st.rates[k].append(tokens / seconds)

    def summary(self) -> dict:
        return {str(b): st.summary() for b, st in sorted(self.buckets.items())}
