"""Batching: concurrent requests share forward passes, in waves.

One decode thread runs the engine. Requests wait in a queue; when the engine is free, the oldest
waiting request and every other waiting request with the same decode settings (mode, k,
temperature, top_p, EOS handling) that fits the context beside it, up to `max_batch`, form a
wave: one batched `generate` call. A row leaves the wave as soon as it is finished (max_tokens,
a stop token or sequence, its client gone): the decoder's `on_tokens` callback tells it to stop
that row. Requests arriving during a wave wait for the next one; that wait, at most one wave
(the longest max_tokens in it), is the latency cost of waves over continuous batching
(docs/SERVING.md measures it).

A request's text does not depend on its batch mates: every row samples from its own noise
stream, seeded by the request's seed (kforcing.core.noise), and rows are left-padded with their
own positions. With `--k auto` the k (and so the K-Forcing mode's text) follows the batch size;
AR and lossless text never depends on k.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kforcing.errors import KForcingError
from kforcing.serving.schemas import APIError
from kforcing.serving.text import TextStream

log = logging.getLogger("kforcing.serve")

# on_tokens(new tokens per row) -> per-row "stop this row now" flags
OnTokens = Callable[[list[list[int]]], list[bool] | None]


@dataclass(frozen=True)
class WaveKey:
    """Decode settings a whole wave shares (the decoders take one of each per batch)."""
    mode: str
    k: int | str | None          # the request's k; None = the server's default
    temperature: float
    top_p: float
    stop_at_eos: bool


@dataclass
class Wave:
    key: WaveKey
    prompts: list[list[int]]
    seeds: list[int]
    max_new_tokens: int


@dataclass(frozen=True)
class Plan:
    """How the engine decodes a wave: the mode and k it resolved (`--k auto` picks k per batch
    size, and may pick plain AR; `tuned` marks such a choice, whose wave the engine times)."""
    mode: str
    k: int
    tuned: bool = field(default=False, compare=False)


class Engine(Protocol):
    def plan(self, key: WaveKey, batch_size: int) -> Plan: ...

    def decode(self, wave: Wave, plan: Plan, on_tokens: OnTokens) -> None: ...


@dataclass
class Event:
    kind: str                     # "text", "end" or "error"
    text: str = ""
    tokens: int = 0               # the request's tokens so far ("text")
    passes: int = 0               # the decoder steps it took part in so far ("text")
    error: APIError | None = None


@dataclass
class Job:
    """One request inside the scheduler. `feed` runs on the decode thread; the app reads
    `events` on its event loop."""
    prompt: list[int]
    seed: int
    key: WaveKey
    text: TextStream
    usable_context: int           # prompt + new tokens must fit in this (mode- and k-specific)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False       # the client went away
    created: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    ended: float | None = None
    passes: int = 0
    batch_size: int = 0
    mode: str = ""
    k: int = 0
    note: str | None = None       # why the server ended the request early ("shutdown")

    @property
    def done(self) -> bool:
        return self.ended is not None

    def fits(self, max_new_tokens: int) -> bool:
        return len(self.prompt) + max_new_tokens <= self.usable_context

    def cancel(self) -> None:
        self.cancelled = True

    def feed(self, new: list[int]) -> bool:
        """Tokens of one decoder step; True = stop this row."""
        if self.done:
            return True
        if self.cancelled:
            self._end("cancelled", note="client disconnected")
            return True
        if new:
            self.passes += 1
            if self.first_token is None:
                self.first_token = time.perf_counter()
        delta = self.text.feed(new)
        if delta.text:
            self._emit(Event("text", delta.text, len(self.text.tokens), self.passes))
        if delta.finish_reason is not None:
            self._end(delta.finish_reason)
        return self.done

    def close(self, reason: str = "length", note: str | None = None) -> None:
        """The decoder stopped this row (or the server ends it): flush and end."""
        if self.done:
            return
        delta = self.text.close(reason)
        if delta.text:
            self._emit(Event("text", delta.text, len(self.text.tokens), self.passes))
        self._end(self.text.finish_reason or reason, note)

    def fail(self, error: APIError) -> None:
        if not self.done:
            self.ended = time.perf_counter()
            self._emit(Event("error", error=error))

    def stats(self) -> dict:
        """The per-request figures returned in the response's `kforcing` field."""
        n = len(self.text.tokens)
        decode_s = (self.ended or time.perf_counter()) - (self.started or self.created)
        out = {"mode": self.mode, "k": self.k, "seed": self.seed, "batch_size": self.batch_size,
               "forward_passes": self.passes,
               "tokens_per_pass": round(n / self.passes, 3) if self.passes else 0.0,
               "tokens_per_s": round(n / decode_s, 2) if decode_s > 0 else 0.0,
               "queue_ms": round(1000 * ((self.started or self.created) - self.created), 2),
               "ttft_ms": round(1000 * (self.first_token - self.created), 2)
               if self.first_token is not None else None,
               "latency_ms": round(1000 * ((self.ended or time.perf_counter()) - self.created),
                                   2)}
        if self.note:
            out["note"] = self.note
        return out

    def _end(self, reason: str, note: str | None = None) -> None:
        self.text.finish_reason = self.text.finish_reason or reason
        self.note = self.note or note
        self.ended = time.perf_counter()
        self._emit(Event("end"))

    def _emit(self, event: Event) -> None:
        # RuntimeError: the event loop is gone (server shutting down), nobody listens
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """Collects jobs into waves and runs them on one decode thread.

    max_wait_s: when the decode thread is free and fewer requests wait than the last wave had
    plus those that were already waiting when it ended, it waits for more before it starts the
    next wave: while they keep arriving (no pause longer than gap_s), up to max_wait_s. Clients
    whose requests just ended send their next ones within milliseconds; without the wait the
    next wave starts with whichever arrived first, the rest wait a whole wave, and a steady load
    splits into two alternating waves of about half the size (seen at concurrency 32: mean batch
    17). Traffic whose clients do not come back pays about gap_s per wave."""

    def __init__(self, engine: Engine, max_batch: int, max_wait_s: float = 0.1,
                 gap_s: float = 0.01):
        if max_batch < 1:
            raise KForcingError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait_s >= 0:
            raise KForcingError(f"the batch wait must be >= 0 seconds, got {max_wait_s}")
        self.engine, self.max_batch, self.max_wait_s = engine, max_batch, max_wait_s
        self.gap_s = gap_s
        self._arrivals = 0             # requests submitted so far
        self._last_size = 1            # rows in the last wave
        self._backlog = 0              # requests waiting when it ended
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._deadline: float | None = None     # set by drain(): end every row by then
        self.running: list[Job] = []
        self.waves = 0
        self._thread = threading.Thread(target=self._loop, name="kforcing-decode", daemon=True)

    # -- the app's side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed or self._deadline is not None:
                raise APIError(503, "the server is shutting down and takes no new requests",
                               code="shutting_down")
            self._pending.append(job)
            self._arrivals += 1
            self._cond.notify()

    @property
    def draining(self) -> bool:
        return self._deadline is not None or self._closed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drain(self, grace_s: float) -> None:
        """Take no new jobs; finish the accepted ones, ending any still running after grace_s."""
        with self._cond:
            if self._deadline is None:
                self._deadline = time.perf_counter() + grace_s
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop the decode thread once the accepted jobs are done (or ended by the deadline)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the decode thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while (jobs := self._next_wave()) is not None:
            if jobs:
                self._run(jobs)

    def _next_wave(self) -> list[Job] | None:
        """Block until jobs wait; None when closed and idle. Past the drain deadline, jobs still
        waiting are refused instead of started."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if self._pending:
                    if self._deadline is not None and time.perf_counter() > self._deadline:
                        for job in self._pending:
                            job.fail(APIError(503, "the server shut down before this request "
                                              "started", code="shutting_down"))
                        self._pending.clear()
                        continue
                    self._gather()
                    return self._take_wave()
                if self._closed or self._deadline is not None:
                    return None
                self._cond.wait()

    def _gather(self) -> None:
        """While fewer jobs wait than the last wave had plus its backlog, wait (the lock
        released) for more as long as they keep coming, up to max_wait_s; not while closing."""
        end = time.perf_counter() + self.max_wait_s
        target = min(self._last_size + self._backlog, self.max_batch)
        seen = self._arrivals
        while (len(self._pending) < target and not self._closed and self._deadline is None
               and (left := end - time.perf_counter()) > 0):
            self._cond.wait(min(left, self.gap_s))
            if self._arrivals == seen:        # a pause: nobody else is coming soon
                break
            seen = self._arrivals

    def _take_wave(self) -> list[Job]:
        head = self._pending[0]
        wave, max_new = [], 0
        for job in list(self._pending):
            if len(wave) == self.max_batch:
                break
            if job.cancelled or job.key != head.key:
                continue
            new_max = max(max_new, job.text.max_tokens)
            if all(j.fits(new_max) for j in [*wave, job]):
                wave.append(job)
                max_new = new_max
        for job in wave:
            self._pending.remove(job)
        self._last_size = len(wave)
        return wave

    def _run(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.started, job.batch_size = now, len(jobs)
        self.running = jobs
        wave = Wave(jobs[0].key, [j.prompt for j in jobs], [j.seed for j in jobs],
                    max(j.text.max_tokens for j in jobs))

        def on_tokens(new_rows: list[list[int]]) -> list[bool]:
            late = self._deadline is not None and time.perf_counter() > self._deadline
            stops = []
            for job, new in zip(jobs, new_rows, strict=True):
                stop = job.feed(new)
                if late and not stop:
                    job.close("length", note="server shutdown")
                    stop = True
                stops.append(stop)
            return stops

        try:
            plan = self.engine.plan(wave.key, len(jobs))
            for job in jobs:
                job.mode, job.k = plan.mode, plan.k
            self.engine.decode(wave, plan, on_tokens)
        except KForcingError as e:
            for job in jobs:
                job.fail(APIError(400, str(e)))
        except Exception as e:   # a bug: say so once, keep serving the other requests
            log.exception("decoding a wave of %d requests failed", len(jobs))
            for job in jobs:
                job.fail(APIError(500, f"internal error while decoding: {type(e).__name__}",
                                  code="internal_error"))
        for job in jobs:
            job.close("length")
        with self._cond:
            self._backlog = len(self._pending)
        self.running = []
        self.waves += 1
