"""Learning curves of chains of stages (evaluation/curves.py): both designs' metrics.jsonl
formats read onto one cumulative CPU-minute axis, the points picked for a table, the figure
and its JSONL; and the distiller's CPU clock those minutes come from."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kforcing.errors import KForcingError
from kforcing.evaluation.curves import (
    CurvePoint,
    chain_points,
    main,
    plot_designs,
    point_at,
    series,
)
from kforcing.students.pushforward import StudentConfig
from kforcing.training.distill import DistillConfig, Distiller


def write_metrics(d: Path, recs: list[dict]) -> Path:
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def pf_val(pos: list[float], joint: float) -> dict:
    """A pushforward validation record's 'val' (keys 'tau1', 'tau0.7')."""
    return {"tau1": {"first": pos[0], "joint": joint, "per_pos": pos, "windows": 8},
            "tau0.7": {"first": pos[0] / 2, "joint": joint / 2,
                       "per_pos": [p / 2 for p in pos], "windows": 8}}


def fb_val(pos: list[float], joint: float) -> dict:
    """A feedback validation record's 'val' (keys 'tau=1.0', 'tau=0.7')."""
    return {f"tau={t}": {"windows": 16, "per_position": [p * t for p in pos],
                         "prefix": pos, "joint": joint * t} for t in (1.0, 0.7)}


@pytest.fixture
def pushforward_chain(tmp_path) -> list[Path]:
    k1 = write_metrics(tmp_path / "k1", [
        {"step": 0, "minutes": 0.0, "val": pf_val([0.1], 0.1)},
        {"step": 1, "minutes": 1.0, "loss": 3.0, "match": [0.2]},
        {"step": 2, "minutes": 2.01, "loss": 2.0, "match": [0.3], "val": pf_val([0.3], 0.3)},
        {"step": 3, "minutes": 2.5, "loss": 1.0, "match": [0.4]}])       # no val: offset only
    k2 = write_metrics(tmp_path / "k2", [
        {"step": 0, "minutes": 0.0, "val": pf_val([0.4, 0.1], 0.05)},
        {"step": 4, "minutes": 3.0, "val": pf_val([0.5, 0.2], 0.1)},
        {"step": 4, "minutes": 3.0, "val": pf_val([0.5, 0.2], 0.1), "final": True}])
    return [k1, k2]


def test_pushforward_stages_are_shifted_by_the_earlier_stages_minutes(pushforward_chain):
    pts = chain_points("shared", pushforward_chain)
    at1 = [(p.minutes, p.stage_k, p.per_position, p.joint) for p in pts if p.tau == 1.0]
    assert at1 == [(0.0, 1, [0.1], 0.1), (2.01, 1, [0.3], 0.3),
                   (2.5, 2, [0.4, 0.1], 0.05), (5.5, 2, [0.5, 0.2], 0.1)]
    at07 = [p.per_position for p in pts if p.tau == 0.7]
    assert at07 == [[0.05], [0.15], [0.2, 0.05], [0.25, 0.1]]
    assert {p.design for p in pts} == {"shared"} and {p.windows for p in pts} == {8}


def test_feedback_stages_keep_their_cumulative_cpu_minutes(tmp_path):
    s1 = write_metrics(tmp_path / "s1", [
        {"step": 0, "cpu_min": 0.0, "cum_cpu_min": 4.0, "k": 1, "val": fb_val([1, .5, .25], .2)},
        {"step": 9, "cpu_min": 3.0, "cum_cpu_min": 7.0, "k": 1, "loss": 1.0}])
    k2 = write_metrics(tmp_path / "k2", [
        {"step": 0, "cpu_min": 0.0, "cum_cpu_min": 7.0, "k": 2, "val": fb_val([1, .6, .3], .25)}])
    pts = chain_points("feedback", [s1, k2])
    assert [(p.minutes, p.stage_k, p.tau, p.eval_k) for p in pts] == [
        (4.0, 1, 1.0, 3), (4.0, 1, 0.7, 3), (7.0, 2, 1.0, 3), (7.0, 2, 0.7, 3)]
    assert pts[2].per_position == [1.0, 0.6, 0.3] and pts[3].joint == pytest.approx(0.25 * 0.7)


def test_point_at_takes_the_latest_point_at_or_before_the_minute(pushforward_chain):
    pts = chain_points("shared", pushforward_chain)
    assert point_at(pts, 2.0, 1.0).minutes == 2.01           # within the slack
    assert point_at(pts, 2.0, 1.0, slack=0.0).minutes == 0.0
    assert point_at(pts, 6.0, 0.7).per_position == [0.25, 0.1]
    assert point_at(pts, 2.0, 1.0, position=2) is None       # stage k=1 has no position 2
    assert point_at(pts, 9.0, 1.0, eval_k=1).minutes == 2.01
    assert point_at(pts, 9.0, 0.5) is None


def test_series_takes_a_position_only_where_the_window_has_it(pushforward_chain):
    pts = chain_points("shared", pushforward_chain)
    assert series(pts, 1.0, "pos1", 2) == ([0.0, 2.01, 2.5, 5.5], [10.0, 30.0, 40.0, 50.0])
    assert series(pts, 1.0, "pos2", 2) == ([2.5, 5.5], [10.0, 20.0])
    assert series(pts, 0.7, "joint", 2) == ([2.5, 5.5], [2.5, 5.0])
    assert series(pts, 0.7, "joint", 4) == ([], [])


def test_plot_designs_writes_every_point_to_jsonl(pushforward_chain, tmp_path):
    chains = {"shared": chain_points("shared", pushforward_chain)}
    png, jsonl = plot_designs(chains, tmp_path / "fig" / "designs", joint_k=2)
    assert png.name == "designs.png" and png.stat().st_size > 0
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    back = [CurvePoint(**{k: v for k, v in r.items() if k != "eval_k"}) for r in rows]
    assert back == chains["shared"]
    assert [r["eval_k"] for r in rows] == [p.eval_k for p in back]


def test_main_reads_chains_and_refuses_a_label_without_runs(pushforward_chain, tmp_path, capsys):
    main(["--chain", "a b", *map(str, pushforward_chain), "--out", str(tmp_path / "o")])
    assert json.loads(capsys.readouterr().out)["points"] == {"a b": 8}
    assert (tmp_path / "o.png").is_file() and (tmp_path / "o.jsonl").is_file()
    with pytest.raises(KForcingError, match="label and at least one run"):
        main(["--chain", "alone", "--out", str(tmp_path / "p")])


def test_unreadable_runs_are_user_errors(tmp_path):
    with pytest.raises(KForcingError, match="no metrics.jsonl"):
        chain_points("x", [tmp_path])
    bad = write_metrics(tmp_path / "bad", [{"step": 0, "minutes": 0.0, "val": {"tauX": {}}}])
    with pytest.raises(KForcingError, match="tauX"):
        chain_points("x", [bad])


# -- the distiller's minutes are CPU-minutes on a CPU ------------------------------------------


def test_distill_budget_and_logged_minutes_use_process_cpu_time(
        saved_tiny_model, tiny_corpus, tmp_path, monkeypatch):
    """A fake CPU clock that advances 15 s per reading: each training step costs exactly a
    quarter CPU-minute whatever the wall clock does, so a 1-minute budget is 4 steps, and a
    k=2 stage from it lands after them on the chain's axis."""
    ticks = iter(range(0, 10**6, 15))
    monkeypatch.setattr(time, "process_time", lambda: float(next(ticks)))
    outs = []
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        cfg = DistillConfig(teacher=str(saved_tiny_model), data=str(tiny_corpus.dir),
                            out_dir=str(out), k=k, init=str(outs[-1]) if outs else None,
                            student=StudentConfig(max_k=2), block_size=16, windows=4,
                            batch_size=2, max_steps=50, time_budget_min=1.0,
                            eval_every_min=0.5, eval_contexts=8, ckpt_every=1000)
        rec = Distiller(cfg, progress=False).fit()
        assert rec["step"] == 4 and rec["minutes"] == 1.0
        outs.append(out)
    pts = [p for p in chain_points("shared", outs) if p.tau == 1.0]
    assert [(p.minutes, p.eval_k) for p in pts] == [
        (0.0, 1), (0.5, 1), (1.0, 1), (1.0, 2), (1.5, 2), (2.0, 2)]
