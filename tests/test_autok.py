"""`k="auto"` falls back to AR when in doubt: a preempted calibration, a cached k that does not
beat AR again in the process it serves; and the candidates are timed in turns. Fake timers
force each branch (the margin / noise branches: tests/test_bench.py)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import fake_watch
from test_feedback import tiny_student as feedback_student

from kforcing.decoding import autok
from kforcing.decoding.autok import choose_k, measure_tokens_per_s
from kforcing.decoding.feedback_window import WindowGraph
from kforcing.students.pushforward import PushForward, StudentConfig


@pytest.fixture
def student(make_model) -> PushForward:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return PushForward(make_model(), StudentConfig(max_k=2)).eval()


def table(ar: float, k2: float):
    """A fake timer: three identical runs per candidate; records what it was asked."""
    calls = []

    def timer(s, B, ks, context):
        calls.append(tuple(ks))
        return {k: [ar if k == 1 else k2] * 3 for k in ks}
    return timer, calls


def test_a_preempted_calibration_decodes_ar_and_is_not_reused(student, tmp_path, monkeypatch):
    # the process got 0.3 CPU seconds per wall second
    monkeypatch.setattr(autok, "Watch", fake_watch(2.5, 0.3))
    timer, calls = table(ar=10.0, k2=40.0)              # k=2 would win by 4x
    choice = choose_k(student, 1, cache=tmp_path, timer=timer)
    assert choice.k == 1 and "0.30 CPU seconds per second" in choice.reason
    rec = json.loads((tmp_path / "autok.json").read_text())[choice.key]["batches"]["1"]
    assert rec["usage"]["busy"] is True and rec["usage"]["cpu_share"] == 0.3
    monkeypatch.undo()
    again = choose_k(student, 1, cache=tmp_path, timer=timer)      # recalibrated, not read
    assert (again.k, again.cached, len(calls)) == (2, False, 2)


def test_a_cached_k_is_rechecked_once_in_the_process_it_serves(student, tmp_path, monkeypatch,
                                                               quiet_autok):
    timer, calls = table(ar=10.0, k2=40.0)
    assert choose_k(student, 1, cache=tmp_path, timer=timer).k == 2
    assert choose_k(student, 1, cache=tmp_path, timer=timer).cached and len(calls) == 1
    monkeypatch.setattr(autok, "_CHECKED", set())                  # a new process
    slow, slow_calls = table(ar=50.0, k2=40.0)                     # ... where AR wins now
    choice = choose_k(student, 1, cache=tmp_path, timer=slow)
    assert choice.k == 1 and choice.cached and "did not beat AR again" in choice.reason
    assert slow_calls == [(1, 2)]
    monkeypatch.setattr(autok, "_CHECKED", set())                  # another new process
    confirm, confirm_calls = table(ar=10.0, k2=40.0)
    assert choose_k(student, 1, cache=tmp_path, timer=confirm).k == 2
    assert choose_k(student, 1, cache=tmp_path, timer=confirm).k == 2
    assert confirm_calls == [(1, 2)]                               # once per process


def test_candidates_are_timed_in_turns(student, monkeypatch):
    order = []

    def fake_decode(s, prompts, k, new_tokens):
        order.append(k)
        return types.SimpleNamespace(num_tokens=len(prompts) * new_tokens, decode_seconds=0.01)

    monkeypatch.setattr(autok, "decode_once", fake_decode)
    runs = measure_tokens_per_s(student, 2, [1, 2], context=4, repeats=3, new_tokens=2)
    assert order == [1, 2] + [1, 2] * 3                  # warm-ups, then round robin
    assert runs == {1: [400.0] * 3, 2: [400.0] * 3}


def test_a_calibration_timed_on_a_busy_machine_is_not_reused(student, tmp_path, monkeypatch):
    """Full CPU share but a high load average (other processes on the other cores share the
    memory bus): the choice stands for now, but the next process recalibrates."""
    monkeypatch.setattr(autok, "Watch", fake_watch(9.0, 1.0))
    timer, calls = table(ar=10.0, k2=40.0)
    assert choose_k(student, 1, cache=tmp_path, timer=timer).k == 2
    rec = json.loads((tmp_path / "autok.json").read_text())
    assert next(iter(rec.values()))["batches"]["1"]["usage"]["busy"] is True
    monkeypatch.undo()
    monkeypatch.setattr(autok, "_CHECKED", set())                  # a new process
    again = choose_k(student, 1, cache=tmp_path, timer=timer)
    assert (again.k, again.cached, len(calls)) == (2, False, 2)


def test_compiled_decoders_are_calibrated_apart(make_model):
    """The calibration cache keys a student whose teacher decodes through a compiled graph
    (Transformer.compile_decode), and one whose K-Forcing windows do, apart from the same
    student decoding eagerly."""
    teacher = make_model()
    s = feedback_student(teacher)
    eager = autok.cache_key(s)
    teacher.compiled_step = teacher.decode_static
    assert autok.cache_key(s) == eager + "-compiled"
    object.__setattr__(s, "compiled_window", WindowGraph(s))   # as compile_window sets it
    assert autok.cache_key(s) == eager + "-compiled-window"
    teacher.compiled_step = s.compiled_window = None
    assert autok.cache_key(s) == eager
