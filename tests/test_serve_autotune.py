"""`--k auto` in the server learns from its own waves (serving.autotune), and the scheduler waits
briefly for a wave to fill (Scheduler.max_wait_s)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

from _serve_util import CONTEXT, ServerThread, SlowEngine, make_models, served  # noqa: E402

from kforcing.decoding import autok  # noqa: E402
from kforcing.errors import KForcingError  # noqa: E402
from kforcing.serving import autotune, bench  # noqa: E402
from kforcing.serving.autotune import WaveTuner  # noqa: E402
from kforcing.serving.config import BenchServeConfig, ServeConfig  # noqa: E402
from kforcing.serving.engine import Engine  # noqa: E402
from kforcing.serving.scheduler import Job, Plan, Scheduler, WaveKey  # noqa: E402
from kforcing.serving.text import TextStream  # noqa: E402


def run_waves(tuner: WaveTuner, batch: int, rates: dict[int, float], n: int) -> list[int]:
    """n waves of `batch` rows; a wave decoded with k gives rates[k] tokens per second."""
    ks = []
    for _ in range(n):
        k = tuner.choose(batch)
        tuner.record(batch, k, int(rates[k] * 10), 10.0)
        ks.append(k)
    return ks


def explored(ks: list[int], chosen: int) -> list[int]:
    """The 1-based wave numbers that decoded with the arm not chosen."""
    return [w for w, k in enumerate(ks, 1) if k != chosen]


def test_tuner_tries_both_arms_then_keeps_the_faster_and_explores():
    priors = []
    tuner = WaveTuner(lambda b: priors.append(b) or (4 if b == 1 else 1), max_k=4)
    n, E = 2 * autotune.MIN_WAVES, autotune.EXPLORE_EVERY
    # k=4 10% faster: AR (a close second) is tried again every E waves
    ks = run_waves(tuner, 1, {1: 100.0, 4: 110.0}, 3 * E + n)
    assert ks[:n] == [4] * (n // 2) + [1] * (n // 2)    # the calibration's pick first
    assert explored(ks[n:], 4) == [E, 2 * E, 3 * E]
    # a bucket the calibration gave to AR still tries max_k; k=4 50% faster: AR, clearly
    # slower, is tried again only after 4 E waves
    ks = run_waves(tuner, 8, {1: 100.0, 4: 150.0}, 4 * E + n)
    assert ks[:n] == [1] * (n // 2) + [4] * (n // 2)
    assert explored(ks[n:], 4) == [4 * E - autotune.MIN_WAVES]
    # within the margin AR is kept, and k=4 tried every E waves
    ks = run_waves(tuner, 32, {1: 100.0, 4: 103.0}, 2 * E + n)
    assert explored(ks[n:], 1) == [E, 2 * E]
    assert priors == [1, 8, 32]                        # calibrated once per bucket (8..15: 8)
    assert tuner.summary()["8"]["chosen"] == 4 and tuner.summary()["32"]["chosen"] == 1


def test_tuner_follows_a_change_of_speed():
    tuner = WaveTuner(lambda b: 4, max_k=4)
    run_waves(tuner, 2, {1: 100.0, 4: 110.0}, 20)
    assert tuner.choose(2) == 4
    # the machine changes: AR is now faster; exploration waves bring it back within the window
    ks = run_waves(tuner, 2, {1: 300.0, 4: 200.0}, 12 * autotune.EXPLORE_EVERY)
    assert tuner.summary()["2"]["chosen"] == 1
    assert ks[-autotune.EXPLORE_EVERY:].count(4) <= 1


def test_tuner_with_max_k_one_is_ar():
    tuner = WaveTuner(lambda b: 1, max_k=1)
    assert run_waves(tuner, 4, {1: 10.0}, 5) == [1] * 5


@pytest.fixture(scope="module")
def student(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    _, sdir = make_models(tmp_path_factory.mktemp("served"), tiny_corpus.tokenizer_path,
                          tiny_tokenizer)
    return served(sdir)


def test_engine_times_auto_waves_and_reports_them(student, monkeypatch):
    monkeypatch.setattr(autok, "choose_k", lambda m, b, cache=None: SimpleNamespace(
        k=4 if b == 1 else 1, reason="fake timer"))
    engine = Engine(student, k="auto")
    key = WaveKey("lossless", "auto", 1.0, 1.0, True)
    wave = SimpleNamespace(key=key, prompts=[[5, 6, 7]], seeds=[3], max_new_tokens=6)
    plan = engine.plan(key, 1)
    assert plan == Plan("lossless", 4) and plan.tuned
    engine.decode(wave, plan, lambda new: None)         # a decoder's first wave: not counted
    assert engine.plan(key, 1) == plan
    for _ in range(autotune.MIN_WAVES):
        engine.decode(wave, engine.plan(key, 1), lambda new: None)
    second = engine.plan(key, 1)
    assert second == Plan("ar", 1) and second.tuned    # the other arm's first wave
    for _ in range(1 + autotune.MIN_WAVES):
        engine.decode(wave, second, lambda new: None)
    rates = engine.auto_summary()["lossless"]["1"]["median_tokens_per_s"]
    assert rates["4"] > 0 and rates["1"] > 0
    fixed = engine.plan(WaveKey("lossless", 2, 1.0, 1.0, True), 1)
    assert fixed == Plan("lossless", 2) and not fixed.tuned


class Rig:
    """A scheduler over a fake engine (SlowEngine, no delay) with jobs of one AR setting."""

    def __init__(self, student, *, gate=None, **sched_kw):
        self.engine = SlowEngine(student, delay=0.0, gate=gate)
        self.sched = Scheduler(self.engine, max_batch=8, **sched_kw)
        self.loop = asyncio.new_event_loop()
        self.key = WaveKey("ar", 1, 1.0, 1.0, True)
        self.deadline = time.monotonic() + 60

    def submit(self, n: int) -> list[Job]:
        jobs = [Job(prompt=[5, 6], seed=1, key=self.key,
                    text=TextStream(lambda ids: "x" * len(ids), max_tokens=3),
                    usable_context=CONTEXT, loop=self.loop) for _ in range(n)]
        for j in jobs:
            self.sched.submit(j)
        return jobs

    def wait(self, done) -> None:
        while not done() and time.monotonic() < self.deadline:
            time.sleep(0.01)

    def close(self) -> list[int]:
        """Stop; the sizes of the waves that ran."""
        self.sched.close(timeout=20)
        self.loop.close()
        return [len(w.prompts) for w in self.engine.waves]


def test_scheduler_waits_for_a_wave_to_fill(student):
    rig = Rig(student, max_wait_s=5.0, gap_s=5.0)
    jobs = rig.submit(3)
    rig.sched.start()
    rig.wait(lambda: all(j.done for j in jobs))
    # the clients of a wave of 3 come back one by one: the next wave waits for all three
    later = []
    for _ in range(3):
        later += rig.submit(1)
        time.sleep(0.05)
    rig.wait(lambda: all(j.done for j in later))
    # a lone request waits at most max_wait_s; closing the server ends the wait at once
    last = rig.submit(1)
    assert rig.close() == [3, 3, 1]
    assert all(j.done for j in [*jobs, *later, *last])
    with pytest.raises(KForcingError, match="batch wait"):
        Scheduler(rig.engine, max_batch=2, max_wait_s=-1)
    with pytest.raises(KForcingError, match="--batch-wait-ms"):
        ServeConfig(model="m", batch_wait_ms=-5)


def test_bench_serve_rows_carry_what_k_auto_learned(student, monkeypatch):
    monkeypatch.setattr(autok, "choose_k", lambda m, b, cache=None: SimpleNamespace(
        k=4, reason="fake timer"))
    cfg = BenchServeConfig(modes=("kforcing",), concurrency=(1,), requests=4, max_tokens=5,
                           warmup=0)
    with ServerThread(Engine(student, k="auto"), max_batch=4) as srv:
        (row,) = bench.bench_serve(srv.url, "student", cfg)
    assert (row["errors"], row["lost"], row["truncated"]) == (0, 0, 0)
    learned = row["k_auto"]["1"]
    assert learned["calibrated"] == 4 and set(learned["median_tokens_per_s"]) == {"1", "4"}
    assert learned["waves"] == 4


def test_scheduler_merges_a_split_load(student):
    """Two groups of clients taking turns (one decoded while the other waits) merge: when a
    wave ends with requests waiting, the next wave also waits for the clients it just served."""
    gate = threading.Event()
    rig = Rig(student, gate=gate, max_wait_s=5.0, gap_s=5.0)
    first = rig.submit(2)
    rig.sched.start()
    rig.wait(lambda: rig.engine.waves)
    waiting = rig.submit(2)                  # arrive while the first group is decoded
    gate.set()
    rig.wait(lambda: all(j.done for j in first))
    back = rig.submit(2)                     # the first group comes back
    assert rig.close() == [2, 4]
    assert all(j.done for j in [*first, *waiting, *back])


def test_scheduler_stops_waiting_when_arrivals_pause(student):
    """A wave that cannot fill starts after a pause of gap_s in the arrivals, long before
    max_wait_s."""
    rig = Rig(student, max_wait_s=600.0, gap_s=0.05)
    jobs = rig.submit(2)
    rig.sched.start()
    rig.wait(lambda: all(j.done for j in jobs))
    last = rig.submit(1)                     # target 2, only one comes
    rig.wait(lambda: last[0].done)
    assert last[0].done and time.monotonic() < rig.deadline
    assert rig.close() == [2, 1]
