"""Benchmarks, `--k auto` and `kforcing reproduce` on tiny models: output files, keys and types,
the k-selection rule, its cache, and resuming a finished chain. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kforcing.cli.main import main
from kforcing.core.model import Transformer
from kforcing.decoding import autok
from kforcing.decoding import generate as generate_module
from kforcing.decoding.autok import (
    bucket,
    candidate_ks,
    choose_k,
    measure_tokens_per_s,
    pick_k,
)
from kforcing.decoding.feedback_window import WindowGraph
from kforcing.decoding.generate import generate
from kforcing.errors import KForcingError
from kforcing.evaluation import bench as bench_mod
from kforcing.evaluation.bench import (
    METHODS,
    BenchConfig,
    BenchRow,
    read_rows,
    run_bench,
    write_results,
)
from kforcing.evaluation.bench_rounds import merge_rows
from kforcing.io.checkpoint import load_model
from kforcing.recipes.reproduce import STEPS, ReproduceConfig, run_reproduce
from kforcing.students.feedback import FeedbackConfig, FeedbackStudent
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import save_student


def tiny_student(teacher, layout="teacher-preserving", max_k=4) -> PushForward:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return PushForward(teacher, StudentConfig(max_k=max_k, layout=layout)).eval()


@pytest.fixture
def student_dir(saved_tiny_model, tmp_path) -> Path:
    out = tmp_path / "student"
    save_student(tiny_student(load_model(saved_tiny_model)), out, saved_tiny_model)
    return out


# -- autok ---------------------------------------------------------------------------------------

def test_pick_k_is_the_argmax_with_ar_winning_near_ties():
    assert pick_k({1: 100.0, 2: 180.0, 4: 300.0}).k == 4
    assert pick_k({1: 100.0, 2: 180.0, 4: 150.0}).k == 2
    assert pick_k({1: 100.0, 2: 60.0, 4: 30.0}).k == 1
    assert pick_k({1: 100.0, 2: 112.0, 4: 90.0}).k == 1          # inside the 15% margin
    assert pick_k({1: 100.0, 2: 103.0}, margin=0.0).k == 2
    assert pick_k({1: 100.0, 2: 150.0, 4: 150.0}).k == 2         # ties go to the smaller k
    with pytest.raises(KForcingError, match="AR entry"):
        pick_k({2: 1.0})
    assert candidate_ks(4) == [1, 2, 4] and candidate_ks(8) == [1, 2, 4, 8]
    assert candidate_ks(3) == [1, 2, 3] and candidate_ks(1) == [1]
    assert [bucket(b) for b in (1, 3, 4, 100, 256)] == [1, 4, 4, 128, 256]


def test_pick_k_every_branch_says_why():
    """AR fastest, a k inside the margin, a k whose repeats overlap AR's (noise), a clear win."""
    ar_best = pick_k({1: [100, 101, 99], 2: [80, 81, 79]})
    assert ar_best.k == 1 and "AR was the fastest" in ar_best.reason
    margin = pick_k({1: [100, 100, 100], 2: [110, 110, 110]})
    assert margin.k == 1 and "only 10%" in margin.reason
    noisy = pick_k({1: [100, 100, 190], 2: [60, 150, 160]})        # median 1.5x, one run slow
    assert noisy.k == 1 and "too noisy" in noisy.reason
    win = pick_k({1: [100, 102, 98], 4: [250, 260, 240], 2: [150, 150, 150]})
    assert win.k == 4 and "2.50x" in win.reason and "median of 3 runs" in win.reason
    # the machine ran twice as fast in round 2 for both: compared round by round, k=4 wins
    drift = pick_k({1: [100, 200, 100], 4: [150, 300, 150]})
    assert drift.k == 4 and "same round" in drift.reason
    assert pick_k({1: [100, 200, 100], 4: [150, 190, 150]}).k == 4       # one slow round
    lost = pick_k({1: [100, 200, 100], 4: [150, 190, 90]})
    assert lost.k == 1 and "only 1 of 3 rounds" in lost.reason and "too noisy" in lost.reason
    # runs not in rounds (different counts): every run must beat every AR run
    assert pick_k({1: [100], 4: [150, 90, 160]}).k == 1
    assert pick_k({1: [100], 4: [150, 140, 160]}).k == 4


def test_choose_k_calibrates_once_and_reads_the_cache(make_model, tmp_path, quiet_autok):
    student = tiny_student(make_model())
    calls = []

    def timer(s, B, ks, context):
        calls.append((B, tuple(ks)))
        return {1: 10.0 * B, 2: 30.0 * B, 4: 20.0 * B} if B < 64 else {1: 10.0 * B, 2: 5.0 * B,
                                                                        4: 2.0 * B}

    a = choose_k(student, 3, cache=tmp_path, timer=timer)
    assert (a.k, a.bucket, a.cached) == (2, 4, False)
    assert calls == [(4, (1, 2, 4))]
    assert "k=2" in a.reason and "speed only" in a.note
    b = choose_k(student, 4, cache=tmp_path, timer=timer)
    assert (b.k, b.cached, b.tokens_per_s) == (2, True, a.tokens_per_s)
    assert b.reason == a.reason + " (calibration read from the cache)"
    assert len(calls) == 1
    c = choose_k(student, 200, cache=tmp_path, timer=timer)
    assert (c.k, c.bucket, c.cached) == (1, 256, False)
    data = json.loads((tmp_path / "autok.json").read_text())
    entry = data[a.key]
    assert set(entry["batches"]) == {"4", "256"}
    assert entry["batches"]["4"]["runs"] == {"1": [40.0], "2": [120.0], "4": [80.0]}
    assert entry["machine"]["threads"] == torch.get_num_threads()
    assert choose_k(student, 4, cache=tmp_path, timer=timer, recalibrate=True).cached is False
    assert len(calls) == 3


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
def test_real_calibration_times_the_real_decoders(make_model, layout):
    student = tiny_student(make_model(), layout=layout)
    runs = measure_tokens_per_s(student, 2, [1, 2, 4], context=8, repeats=2, new_tokens=4)
    assert sorted(runs) == [1, 2, 4]
    assert all(len(v) == 2 and all(isinstance(x, float) and x > 0 for x in v)
               for v in runs.values())


def test_auto_for_a_plain_ar_model_is_k1(make_model, tmp_path):
    model = make_model()
    with pytest.raises(KForcingError, match="needs a K-Forcing student"):
        choose_k(model, 1, cache=tmp_path)
    auto = generate(model, [[1, 2, 3]], 4, k="auto", seed=1)
    assert auto.tokens == generate(model, [[1, 2, 3]], 4, seed=1).tokens
    assert "auto" not in auto.extra


@pytest.mark.parametrize("table, k", [({1: 10.0, 2: 40.0, 4: 20.0}, "2"),
                                      ({1: 50.0, 2: 40.0, 4: 20.0}, None)])
def test_generate_k_auto_cli(capsys, saved_tiny_model, student_dir, tmp_path, monkeypatch, table,
                             k):
    """With a fake timer the choice is known, so `--k auto` prints exactly what `--k 2` (k wins)
    or the teacher's AR (AR wins) prints; a plain model is AR either way."""
    monkeypatch.setenv("KFORCING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autok, "measure_tokens_per_s",
                        lambda s, B, ks, context: {kk: [table[kk]] * 3 for kk in ks})

    def completion(model, *flags):
        rc = main(["generate", "--model", str(model), "--prompt", "the river",
                   "--max-new-tokens", "4", "--json", "--seed", "3", *flags])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return json.loads(out.splitlines()[0])["tokens"], err

    auto, err = completion(student_dir, "--k", "auto")
    assert auto == completion(*((student_dir, "--k", k) if k else (saved_tiny_model,)))[0]
    assert '"auto"' in err and "speed only" in err
    assert completion(saved_tiny_model, "--k", "auto")[0] == completion(saved_tiny_model)[0]
    assert (tmp_path / "cache" / "autok.json").is_file()
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(saved_tiny_model), "--k", "three"])
    assert "or 'auto'" in capsys.readouterr().err


# -- bench ---------------------------------------------------------------------------------------

ROW_TYPES = {"method": str, "batch_size": int, "new_tokens": int, "prompt_len": int,
             "sampling": str, "tokens_per_s": float, "repeats": int, "machine": dict,
             "command": str, "runs_tokens_per_s": list, "extra": dict}


def test_bench_writes_typed_rows_and_plots(make_model, tmp_path):
    teacher = make_model()
    student = tiny_student(teacher)
    draft = make_model(seed=3, n_layer=1)
    cfg = BenchConfig(batch_sizes=(1, 2), prompt_len=4, new_tokens=4, repeats=2,
                      max_seconds=2.0, cache=str(tmp_path / "cache"))
    res = run_bench(teacher, student, draft=draft, cfg=cfg, command="test", progress=False)
    paths = write_results(res, tmp_path / "out")
    rows = read_rows(paths["jsonl"])
    for r in rows:
        for key, typ in ROW_TYPES.items():
            assert isinstance(r[key], typ), (key, r)
        assert r["k"] is None or isinstance(r["k"], int)
        assert r["step_latency_ms"] is None or r["step_latency_ms"] > 0
        assert 1 <= r["repeats"] <= 2 and r["tokens_per_s"] > 0
        assert r["method"] in METHODS
        assert r["machine"]["threads"] >= 1 and r["machine"]["cpu"]
    got = {(r["method"], r["k"], r["sampling"], r["batch_size"]) for r in rows}
    for b in (1, 2):
        assert {("ar", 1, "sample", b), ("kforcing", 4, "sample", b),
                ("hf-generate", None, "greedy", b), ("hf-generate", None, "sample", b)} <= got
        assert {1, 2, 4} <= {r["k"] for r in rows if r["method"] == "kforcing"}
        assert any(r["method"] == "kforcing-auto" and r["batch_size"] == b for r in rows)
    assert [r["batch_size"] for r in rows if r["method"] == "hf-assisted"] == [1]
    assert {"method": "hf-assisted", "batch_size": 2,
            "reason": "transformers assisted generation supports batch size 1 only"
            } in res.skipped
    # lossless runs with a student at every batch size (it is never skipped)
    lossless = [r for r in rows if r["method"] == "lossless"]
    assert [r["batch_size"] for r in lossless] == [1, 2]
    assert not any(s["method"] == "lossless" for s in res.skipped)
    for r in lossless:
        assert r["k"] == 4 and r["extra"]["fused"] is True
        assert 1.0 <= r["extra"]["tokens_per_pass"] <= 5.0
        assert r["extra"]["mean_accepted_per_pass"] >= 0
    auto = [r for r in rows if r["method"] == "kforcing-auto"]
    assert all(r["extra"]["reason"] for r in auto)
    for key in ("tokens_png", "speedup_png"):
        assert paths[key].stat().st_size > 1000
    meta = json.loads(paths["meta"].read_text())
    assert meta["command"] == "test" and "kforcing k=4" in meta["speedup_over_ar"]


def test_interleaved_bench_takes_turns_and_merges_rounds(make_model, monkeypatch):
    """--interleave: at each batch size the methods run one timed run each per round, the order
    rotating; a row merges its rounds (every run kept, the median over them)."""
    teacher = make_model()
    order = []
    real = dict(bench_mod.ROWS)
    for name in ("ar", "kforcing"):
        monkeypatch.setitem(bench_mod.ROWS, name, lambda b, B, k, p, name=name: (
            order.append((B, name, k, b.cfg.repeats)) or real[name](b, B, k, p)))
    cfg = BenchConfig(batch_sizes=(1, 2), prompt_len=4, new_tokens=3, repeats=3, ks=(2,),
                      methods=("ar", "kforcing"), roofline=False, interleave=True)
    res = run_bench(teacher, tiny_student(teacher), cfg=cfg, command="test", progress=False)
    assert order == [(1, "ar", None, 1), (1, "kforcing", 2, 1), (1, "kforcing", 2, 1),
                     (1, "ar", None, 1), (1, "ar", None, 1), (1, "kforcing", 2, 1),
                     (2, "ar", None, 1), (2, "kforcing", 2, 1), (2, "kforcing", 2, 1),
                     (2, "ar", None, 1), (2, "ar", None, 1), (2, "kforcing", 2, 1)]
    assert [(r.batch_size, r.method) for r in res.rows] == [
        (1, "ar"), (1, "kforcing"), (2, "ar"), (2, "kforcing")]
    for r in res.rows:
        assert r.repeats == 3 and len(r.runs_tokens_per_s) == 3 and r.extra["interleaved"]
        assert r.tokens_per_s == sorted(r.runs_tokens_per_s)[1]
        assert r.machine["wall_seconds"] > 0


def test_merge_rows_keeps_every_run_and_the_load_around_them():
    def row(rate, load, busy):
        return BenchRow("ar", 1, 1, 4, 3, "sample", rate, 2.0 * rate, 3, 1, [rate],
                        {"load_avg_1m": load, "cpu_seconds": 1.0, "wall_seconds": 2.0,
                         "busy": busy, "busy_reasons": ["x"] if busy else []}, "c", {"a": rate})
    m = merge_rows([row(10.0, 0.5, False), row(30.0, 0.7, True), row(20.0, 0.9, False)])
    assert (m.tokens_per_s, m.step_latency_ms, m.repeats) == (20.0, 40.0, 3)
    assert m.runs_tokens_per_s == [10.0, 30.0, 20.0]
    assert m.machine["load_avg_1m"] == 0.5 and m.machine["cpu_share"] == 0.5
    assert m.machine["busy"] and m.machine["busy_reasons"] == ["x"]
    assert m.extra == {"a": 20.0, "interleaved": True}


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0])
def test_bench_temperature_must_be_finite_and_positive(temperature):
    with pytest.raises(KForcingError, match="bench temperature must be a finite number > 0"):
        BenchConfig(temperature=temperature)


def test_bench_cli_without_student(capsys, saved_tiny_model, tmp_path):
    rc = main(["bench", "--model", str(saved_tiny_model), "--batch-sizes", "1",
               "--new-tokens", "3", "--prompt-len", "3", "--repeats", "1", "--no-hf",
               "--out", str(tmp_path), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = read_rows(tmp_path / "bench.jsonl")
    assert [r["method"] for r in rows] == ["ar"]
    assert "no K-Forcing student" in err
    assert main(["bench", "--batch-sizes", "1,x", "--out", str(tmp_path)]) == 1
    assert "comma-separated integers" in capsys.readouterr().err


# -- reproduce -----------------------------------------------------------------------------------

def test_reproduce_smoke_and_resume(tiny_corpus, tmp_path, capsys):
    cfg = ReproduceConfig(
        out=str(tmp_path / "run"), results=str(tmp_path / "docs" / "RESULTS.md"),
        results_dir=str(tmp_path / "docs" / "results"), data=str(tiny_corpus.dir),
        cache=str(tmp_path / "cache"), teacher_preset="tiny", teacher_min=0.01, stage_min=0.01,
        draft_min=0.005, teacher_block_size=32, teacher_batch_size=4, distill_block_size=16,
        distill_batch_size=4, eval_contexts=4, match_windows=16, sample_tokens=6,
        judge="none", eval={"new_tokens": 6, "prompts": 4, "prompt_len": 8, "context_len": 16,
                            "windows": 16, "tv_contexts": 2, "tv_draws": 16},
        bench_batch_sizes=(1,), bench_new_tokens=4, bench_repeats=1, progress=False)
    first = run_reproduce(cfg, command="kforcing reproduce (test)")
    assert first.ran == list(STEPS) and first.skipped == []
    doc = first.results.read_text()
    for heading in ("## Machine", "## Pipeline", "## Teacher", "## Speed", "## Samples"):
        assert heading in doc
    assert "kforcing reproduce (test)" in doc and "kforcing distill" in doc
    assert (tmp_path / "docs" / "results" / "bench.jsonl").is_file()
    assert (tmp_path / "docs" / "results" / "bench_speedup.png").is_file()
    ev = json.loads((tmp_path / "docs" / "results" / "eval.json").read_text())
    assert {"gen_ppl_teacher", "unigram_entropy", "judge_ppl"} <= set(ev["teacher"])
    assert [s["k"] for s in ev["students"]] == [2, 4]
    for s in ev["students"]:
        assert {"k", "tau", "first_token_match", "joint_match", "per_position_match",
                "gen_ppl_teacher", "unigram_entropy", "judge_ppl", "first_token_tv"} <= set(s)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    stamps = {n: s["finished_at"] for n, s in state["steps"].items()}

    second = run_reproduce(cfg, command="kforcing reproduce (test)")
    assert second.ran == [] and second.skipped == list(STEPS)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert {n: s["finished_at"] for n, s in state["steps"].items()} == stamps
    assert second.results.read_text() == doc


def test_ar_compiled_rows_decode_through_the_compiled_step_only(make_model, monkeypatch):
    """--compile adds ar-compiled rows: their runs (and only theirs) go through the teacher's
    compiled step (here the uncompiled static step: no C++ compiler needed), the ar rows stay
    eager, the teacher keeps no compiled step afterwards, and each row records its first run."""
    teacher = make_model()
    used: list[str] = []

    def fake_compile(self, **options):
        def step(*a):
            used.append("compiled")
            return self.decode_static(*a)
        self.compiled_step = step
        return self
    monkeypatch.setattr(Transformer, "compile_decode", fake_compile)
    cfg = BenchConfig(batch_sizes=(1, 2), prompt_len=4, new_tokens=3, repeats=2,
                      methods=("ar", "ar-compiled"), roofline=False)
    res = run_bench(teacher, cfg=cfg, command="test", progress=False)
    assert [(r.batch_size, r.method) for r in res.rows] == [
        (1, "ar"), (1, "ar-compiled"), (2, "ar"), (2, "ar-compiled")]
    # n new tokens take n - 1 steps after the prefill; per ar-compiled row: the first run, the
    # warm-up and 2 timed runs, 3 tokens each
    assert len(used) == 2 * (2 + 2 + 2 * 2)
    assert teacher.compiled_step is None
    assert all("first_run_seconds" in r.extra for r in res.rows if r.method == "ar-compiled")
    with pytest.raises(KForcingError, match="unknown bench method"):
        BenchConfig(methods=("ar-compiledd",))
    cfg = BenchConfig(batch_sizes=(1,), prompt_len=4, new_tokens=3, repeats=1, ks=(2,),
                      methods=("kforcing-compiled",), roofline=False)
    res = run_bench(teacher, tiny_student(teacher), cfg=cfg, command="test", progress=False)
    assert res.rows == [] and "token-feedback" in res.skipped[0]["reason"]


def test_kforcing_compiled_rows_decode_whole_windows_through_the_window_graph(make_model,
                                                                               monkeypatch):
    """--compile with a token-feedback student: kforcing-compiled runs (and only theirs) go
    through the compiled K-Forcing window (here the uncompiled WindowGraph), the student keeps
    no window graph afterwards."""
    teacher = make_model()
    student = FeedbackStudent(teacher, FeedbackConfig(max_k=2)).eval()
    monkeypatch.setattr(Transformer, "compile_decode",
                        lambda self, **o: setattr(self, "compiled_step", self.decode_static))
    monkeypatch.setattr(FeedbackStudent, "compile_draft", lambda self, **o: self)
    windows: list[int] = []

    def fake_window(model):
        graph = WindowGraph(model)

        def run(first, h, p, noise, *a):
            windows.append(noise.shape[1])
            return graph(first, h, p, noise, *a)
        object.__setattr__(model, "compiled_window", run)
        return model
    monkeypatch.setattr(generate_module, "compile_window", fake_window)
    cfg = BenchConfig(batch_sizes=(1,), prompt_len=4, new_tokens=6, repeats=2, ks=(2,),
                      methods=("kforcing", "kforcing-compiled"), roofline=False)
    res = run_bench(teacher, student, cfg=cfg, command="test", progress=False)
    assert [r.method for r in res.rows] == ["kforcing", "kforcing-compiled"]
    # 3 two-token windows per 6-token run: the first run, the 4-token warm-up (2), 2 timed runs
    assert windows == [2] * (3 + 2 + 2 * 3)
    assert student.compiled_window is None
