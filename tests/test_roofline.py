"""Benchmark trust (load, CPU time, busy marks, pinning), roofline bounds and their report
section, and bf16 / feedback-student benchmark rows, on tiny models. No timing assertions: the
calibration runs on a fake timer."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from kforcing.cli.main import main
from kforcing.decoding import machine
from kforcing.decoding.machine import Usage
from kforcing.errors import KForcingError
from kforcing.evaluation.bench import BenchConfig, Run, _row, read_rows, run_bench, write_results
from kforcing.evaluation.bench_machine import busy_warning, parse_cores, pin_cores
from kforcing.evaluation.roofline import (
    Calibration,
    calibrate,
    compute_bound_batch,
    decode_rate,
    fastest,
    linear_params,
    pass_costs,
    roofline_section,
)
from kforcing.students.feedback import FeedbackConfig, FeedbackStudent
from kforcing.students.pushforward import PushForward, StudentConfig


def student_of(teacher, layout="teacher-preserving", max_k=4) -> PushForward:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return PushForward(teacher, StudentConfig(max_k=max_k, layout=layout)).eval()


# -- load and CPU time ---------------------------------------------------------------------------

def test_usage_marks_busy_runs_and_says_why(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)          # busy from a load of 1.5
    quiet = Usage(0.3, 1.2, cpu_seconds=0.95, wall_seconds=1.0, threads=1)
    assert quiet.busy_reasons() == [] and quiet.record()["busy"] is False
    loaded = Usage(2.0, 1.0, 0.95, 1.0, 1)
    assert "load average 2.00 before" in loaded.busy_reasons()[0]
    after = Usage(0.3, 2.6, 0.95, 1.0, 1)                    # 2.6 - our 1 thread >= 1.5
    assert "after the run" in after.busy_reasons()[0]
    preempted = Usage(0.3, 0.3, 0.5, 1.0, 1)
    assert "0.50 CPU seconds per second" in preempted.busy_reasons()[0]
    rec = preempted.record()
    assert rec["busy"] is True and rec["cpu_share"] == 0.5 and rec["load_avg_1m"] == 0.3
    rows = [{"machine": quiet.record()}, {"machine": loaded.record()}]
    assert "busy during 1 of 2" in busy_warning(rows) and "load average up to 2.00" in \
        busy_warning(rows)
    assert busy_warning(rows[:1]) is None


def test_cores_parse_and_pin():
    assert parse_cores("0") == [0] and parse_cores("0,2") == [0, 2]
    assert parse_cores("1-3,0") == [0, 1, 2, 3]
    for bad in ("", "x", "-1", "2-a"):
        with pytest.raises(KForcingError, match="--cores expects"):
            parse_cores(bad)
    before = sorted(os.sched_getaffinity(0))
    try:
        assert pin_cores(before[:1]) == before[:1]
    finally:
        os.sched_setaffinity(0, before)
    with pytest.raises(KForcingError, match="does not exist"):
        pin_cores([os.cpu_count() + 7])


# -- roofline ------------------------------------------------------------------------------------

def test_calibrate_divides_bytes_and_flops_by_the_timed_seconds():
    clock = itertools.count()                 # every timer call is one second later
    cal = calibrate("fp32", dim=64, batch=8, repeats=3, inner=1, timer=lambda: float(next(clock)))
    assert cal.matvec_gb_per_s == pytest.approx(64 * 64 * 4 / 1e9)
    assert cal.matmul_gflop_per_s == pytest.approx(2 * 8 * 64 * 64 / 1e9)
    bf = calibrate("bf16", dim=64, batch=8, repeats=1, inner=1, timer=lambda: float(next(clock)))
    assert bf.matvec_gb_per_s == pytest.approx(cal.matvec_gb_per_s / 2)   # half the bytes
    streamed = calibrate("fp32", working_set=2 * 64 * 64 * 4 + 1, dim=64, batch=8, repeats=1,
                         inner=1, timer=lambda: float(next(clock)))
    assert streamed.matvec_gb_per_s == pytest.approx(3 * 64 * 64 * 4 / 1e9)   # 3 matrices
    assert "0 MB streamed" in streamed.source
    with pytest.raises(KForcingError, match="dtype must be one of"):
        calibrate("fp16")


def test_fastest_of_several_calibrations_is_the_strictest_bound():
    a, b = Calibration("fp32", 10.0, 40.0, "a"), Calibration("fp32", 12.0, 30.0, "b")
    both = fastest([a, b])
    assert (both.matvec_gb_per_s, both.matmul_gflop_per_s) == (12.0, 40.0)
    assert both.source == "the fastest of 2 calibrations: a; b"
    assert fastest([a]) is a


CPU = Calibration("fp32", 10.0, 34.0, "test")
FAST_MATMUL = Calibration("fp32", 10.0, 136.0, "test")


def test_pass_costs_follow_each_design(make_model):
    teacher = make_model()
    ar, k2, k4 = pass_costs(student_of(teacher, "shared"), [2, 4])
    assert ar.weight_params() == linear_params(teacher) and ar.tokens_per_row == 1
    assert (k2.tokens_per_row, k4.tokens_per_row) == (2, 4)
    tp = pass_costs(student_of(teacher), [4])[1]
    assert "teacher-preserving" in tp.method and "shared" in k4.method
    assert tp.weight_params() > k4.weight_params() > ar.weight_params()   # a second stack
    fb = pass_costs(FeedbackStudent(teacher, FeedbackConfig(max_k=4)).eval(), [4])[1]
    assert "feedback" in fb.method and len(fb.segments) == 4              # teacher + 3 drafts
    assert pass_costs(teacher, [4]) == [ar]                               # a plain model: AR
    # memory-bound at batch 1, so a k-token pass is bounded near k x AR; compute-bound at a
    # large batch, where k noise positions per k tokens cap the shared layout near AR / 2
    assert 1 < k4.bound_tokens_per_s(1, CPU) / ar.bound_tokens_per_s(1, CPU) <= 4
    assert k4.bound_tokens_per_s(4096, CPU) / ar.bound_tokens_per_s(4096, CPU) < 0.6
    # a faster matmul (bf16) moves the compute-bound boundary up (at a short context, where
    # reading the KV cache does not outlast the arithmetic)
    ar = pass_costs(teacher, [], context=2)[0]
    b32, b16 = compute_bound_batch(ar, CPU), compute_bound_batch(ar, FAST_MATMUL)
    assert b32 is not None and b16 is not None and b16 > b32
    assert ar.seconds(b32, CPU) == pytest.approx(b32 * sum(s.flops_per_row for s in ar.segments)
                                                 / 34e9)


def test_roofline_section_reports_bounds_fractions_and_the_gpu_estimate(make_model):
    teacher = make_model()
    student = student_of(teacher)
    ar, k4 = pass_costs(student, [4])
    rows = [{"method": "ar", "k": 1, "batch_size": 1, "machine": {"dtype": "fp32"},
             "tokens_per_s": ar.bound_tokens_per_s(1, CPU) / 2},
            {"method": "kforcing", "k": 4, "batch_size": 16, "machine": {"dtype": "fp32"},
             "tokens_per_s": k4.bound_tokens_per_s(16, CPU) / 4}]
    text = roofline_section(student, [4], [CPU, Calibration("bf16", 4.0, 140.0, "test")],
                            [1, 16], rows)
    assert text.startswith("## Roofline") and "docs/METHOD.md" in text
    assert "### fp32: 10.0 GB/s" in text and "### bf16: 4.0 GB/s" in text
    assert "H200" in text and "estimate" in text
    assert "= 50%" in text and "= 25%" in text and text.count(", measured ") == 2
    assert "kforcing k=4 (teacher-preserving)" in text and "compute-bound from B" in text


# -- the benchmark rows ----------------------------------------------------------------------------

def test_bench_rows_carry_load_cpu_and_their_bound(make_model, tmp_path):
    teacher = make_model()
    cfg = BenchConfig(batch_sizes=(1,), prompt_len=4, new_tokens=4, repeats=1, ks=(2,),
                      methods=("ar", "kforcing"), cache=str(tmp_path))
    res = run_bench(teacher, student_of(teacher), cfg=cfg, command="test", progress=False)
    for r in res.rows:
        m = r.machine
        assert {"load_avg_1m", "load_avg_1m_after", "cpu_seconds", "wall_seconds", "busy",
                "busy_reasons", "dtype", "cores_pinned", "weight_layout"} <= set(m)
        assert m["weight_layout"] == "out-major"      # auto: the tiny model fits in any cache
        assert m["cpu_seconds"] > 0 and m["wall_seconds"] > 0 and m["dtype"] == "fp32"
        assert r.extra["fraction_of_bound"] > 0 and r.extra["roofline_bound_tokens_per_s"] > 0
        # the share divides the decode phase's rate (the bound has no prefill in it)
        rate, bound = r.extra["decode_tokens_per_s"], r.extra["roofline_bound_tokens_per_s"]
        assert r.extra["fraction_of_bound"] == pytest.approx(rate / bound, rel=0.01, abs=1e-3)
    roof = res.config["roofline"]["fp32"]
    assert set(roof["methods"]) == {"ar", "kforcing k=2 (teacher-preserving)"}
    meta = json.loads(write_results(res, tmp_path / "out")["meta"].read_text())
    assert "busy_warning" in meta
    assert meta["config"]["roofline"]["fp32"]["calibration"]["dtype"] == "fp32"
    # calibrated before and after the rows; the bound is the faster reading of each rate
    cals = [Calibration(**c) for c in meta["config"]["roofline"]["fp32"]["calibrations"]]
    assert len(cals) == 2
    used = meta["config"]["roofline"]["fp32"]["calibration"]
    assert used["matvec_gb_per_s"] == max(c.matvec_gb_per_s for c in cals)
    assert used["matmul_gflop_per_s"] == max(c.matmul_gflop_per_s for c in cals)
    assert res.roofline_md.startswith("## Roofline") and "kforcing k=2" in res.roofline_md


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_runs_a_feedback_student_in_each_dtype(make_model, tmp_path, dtype):
    teacher = make_model()
    fb = FeedbackStudent(teacher, FeedbackConfig(max_k=2)).eval()
    cfg = BenchConfig(batch_sizes=(2,), prompt_len=4, new_tokens=4, repeats=1, ks=(2,),
                      methods=("ar", "kforcing", "lossless"), dtype=dtype, roofline=False,
                      cache=str(tmp_path))
    res = run_bench(teacher, fb, cfg=cfg, command="test", progress=False)
    assert [(r.method, r.k) for r in res.rows] == [("ar", 1), ("kforcing", 2), ("lossless", 2)]
    assert all(r.machine["dtype"] == dtype and r.tokens_per_s > 0 for r in res.rows)
    assert next(teacher.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[
        dtype]


def test_bench_cli_dtype_cores_and_busy_warning(capsys, saved_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "load_avg_1m", lambda: 99.0)      # a loaded machine
    core = sorted(os.sched_getaffinity(0))
    try:
        rc = main(["bench", "--model", str(saved_tiny_model), "--batch-sizes", "1",
                   "--new-tokens", "3", "--prompt-len", "3", "--repeats", "1", "--no-hf",
                   "--dtype", "bf16", "--cores", str(core[0]), "--no-roofline",
                   "--out", str(tmp_path), "--quiet"])
    finally:
        os.sched_setaffinity(0, core)
    out, err = capsys.readouterr()
    assert rc == 0, err
    row = read_rows(tmp_path / "bench.jsonl")[0]
    assert row["machine"]["dtype"] == "bf16" and row["machine"]["busy"] is True
    assert row["machine"]["load_avg_1m"] == 99.0
    assert "WARNING: the machine was busy" in err and f"pinned to core(s) {core[0]}" in err
    assert json.loads(out.splitlines()[0])["busy"] is True


def test_bench_cli_measures_both_dtypes_and_names_the_winner(capsys, saved_tiny_model, tmp_path):
    rc = main(["bench", "--model", str(saved_tiny_model), "--batch-sizes", "1,2",
               "--new-tokens", "3", "--prompt-len", "3", "--repeats", "1", "--no-hf",
               "--dtype", "fp32,bf16", "--out", str(tmp_path), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = read_rows(tmp_path / "bench.jsonl")
    assert [(r["machine"]["dtype"], r["batch_size"]) for r in rows] == [
        ("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    meta = json.loads((tmp_path / "bench_meta.json").read_text())
    assert set(meta["dtype_winners"]["ar"]) == {"1", "2"}
    assert meta["dtype_winners"]["ar"]["1"].split()[0] in ("fp32", "bf16")
    assert set(meta["config"]["roofline"]) == {"fp32", "bf16"}
    assert set(meta["speedup_over_ar"]) == {"ar", "ar bf16"}
    md = (tmp_path / "roofline.md").read_text()
    assert "### fp32" in md and "### bf16" in md and md.count(", measured ") == 4
    assert '"dtype_winners"' in out
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "fp16"])
    assert "choose from fp32, bf16" in capsys.readouterr().err


def test_bench_cli_layout_is_applied_recorded_and_checked(capsys, saved_tiny_model, tmp_path):
    rc = main(["bench", "--model", str(saved_tiny_model), "--batch-sizes", "1",
               "--new-tokens", "3", "--prompt-len", "3", "--repeats", "1", "--no-hf",
               "--layout", "in-major", "--out", str(tmp_path), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert read_rows(tmp_path / "bench.jsonl")[0]["machine"]["weight_layout"] == "in-major"
    meta = json.loads((tmp_path / "bench_meta.json").read_text())
    assert "out-major" in meta["config"]["roofline"]["fp32"]["calibration"]["source"]
    assert "in-major" in meta["config"]["roofline"]["fp32"]["calibration"]["source"]
    with pytest.raises(SystemExit):
        main(["bench", "--layout", "rows"])
    assert "invalid choice: 'rows'" in capsys.readouterr().err
    with pytest.raises(KForcingError, match="layout must be one of"):
        BenchConfig(layout="rows")


def test_generate_cli_decodes_in_bf16(capsys, saved_tiny_model):
    def run(*flags):
        rc = main(["generate", "--model", str(saved_tiny_model), "--prompt", "the river",
                   "--max-new-tokens", "4", "--json", "--seed", "3", *flags])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return json.loads(out.splitlines()[0])["tokens"]

    assert len(run("--dtype", "bf16")) == 4 and len(run("--dtype", "fp32")) == 4
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(saved_tiny_model), "--dtype", "fp16"])


def test_decode_rate_leaves_out_the_prompt_and_each_rows_first_token():
    run = Run(tokens=3 * 8, passes=8, seconds=2.0, rows=3, decode_seconds=1.5)
    assert run.decode_rate == (24 - 3) / 1.5
    assert Run(8, 8, 2.0).decode_rate is None                      # hf rows: no phase split
    assert Run(3, 1, 1.0, rows=3, decode_seconds=0.5).decode_rate is None    # one token a row
    cfg = BenchConfig(batch_sizes=(3,), new_tokens=8)
    row = _row("ar", 1, "sample", [run, Run(24, 8, 3.0, rows=3, decode_seconds=2.1),
                                   Run(24, 8, 1.0, rows=3, decode_seconds=0.7)], 3, cfg, {}, "t")
    assert row.extra["decode_tokens_per_s"] == round(21 / 1.5, 2)          # the median run
    assert row.tokens_per_s == 24 / 2.0
    assert decode_rate(row.extra, row.tokens_per_s) == row.extra["decode_tokens_per_s"]
    assert decode_rate({}, 12.0) == 12.0
