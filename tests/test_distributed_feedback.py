"""Data-parallel training of the token-feedback student (training/feedback.py, feedback_cache.py,
docs/DISTRIBUTED.md): 2 gloo processes under torchrun against 1 process with the same global
batch and seed. Run as a script (`python tests/test_distributed_feedback.py jobs.json`), this file
is the torchrun worker: it runs the jobs in order, in one process group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from kforcing.core.config import from_dict, load_json
from kforcing.io.checkpoint import load_model
from kforcing.students.feedback import FeedbackConfig
from kforcing.training import distributed
from kforcing.training.feedback import FeedbackTrainConfig, FeedbackTrainer
from kforcing.training.feedback_cache import (
    MANIFEST,
    CacheSpec,
    build_teacher_cache,
    shard_path,
)

TOL = 1e-5


def run_jobs(jobs: list[dict]) -> None:
    """{"cache": CacheSpec fields, "out": dir} builds a cache; {"train": FeedbackTrainConfig
    fields, "resume": bool} trains a stage."""
    for job in jobs:
        if "cache" in job:
            spec = from_dict(CacheSpec, job["cache"])
            build_teacher_cache(load_model(spec.teacher), spec, job["out"], progress=False)
        else:
            cfg = from_dict(FeedbackTrainConfig, job["train"])
            FeedbackTrainer(cfg, resume=job.get("resume", False), progress=False).fit()
    assert distributed.world().world == int(os.environ["WORLD_SIZE"])   # it ran in the group


def torchrun(jobs: list[dict], tmp: Path, nproc: int = 2):
    spec = tmp / f"jobs-{len(list(tmp.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    cmd = distributed.torchrun_command(nproc, [str(spec)], program=(__file__,))
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


def cache_spec(model: Path, corpus) -> CacheSpec:
    # 5 shards: rank 0 computes 0, 2, 4 and rank 1 computes 1, 3
    return CacheSpec(teacher=str(model), tokens=str(corpus.train), block_size=16, top_n=8,
                     windows=18, shard_windows=4)


def train_cfg(model: Path, corpus, out: Path, **kw) -> FeedbackTrainConfig:
    return FeedbackTrainConfig(
        teacher=str(model), data=str(corpus.dir), out_dir=str(out),
        student=FeedbackConfig(max_k=4, draft_vocab_size=50),
        **{"batch_size": 4, "context": 16, "anchors": 4, "eval_windows": 6, "eval_context": 12,
           "eval_every_min": 1000.0, "ckpt_every": 2, "max_steps": 4, "warmup_steps": 2, **kw})


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stages(model: Path, corpus, root: Path) -> list[FeedbackTrainConfig]:
    """Stage k=1 from the cache, then a self-forcing stage k=2 from it."""
    return [train_cfg(model, corpus, root / "k1", k=1, cache=str(root / "cache")),
            train_cfg(model, corpus, root / "k2", k=2, init=str(root / "k1"), max_steps=2)]


@pytest.fixture(scope="module")
def two_proc(saved_tiny_model, tiny_corpus, tmp_path_factory) -> Path:
    """The cache and both stages, built and trained by 2 processes (one torchrun launch)."""
    root = tmp_path_factory.mktemp("ddp-feedback")
    jobs = [{"cache": asdict(cache_spec(saved_tiny_model, tiny_corpus)),
             "out": str(root / "cache")}]
    jobs += [{"train": asdict(c)} for c in stages(saved_tiny_model, tiny_corpus, root)]
    torchrun(jobs, root)
    return root


@pytest.fixture(scope="module")
def one_proc(saved_tiny_model, tiny_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one-feedback")
    spec = cache_spec(saved_tiny_model, tiny_corpus)
    build_teacher_cache(load_model(saved_tiny_model), spec, root / "cache", progress=False)
    for cfg in stages(saved_tiny_model, tiny_corpus, root):
        FeedbackTrainer(cfg, progress=False).fit()
    return root


def test_two_processes_build_the_same_cache(two_proc, one_proc):
    spec = load_json(one_proc / "cache" / MANIFEST)["spec"]
    for root in (one_proc, two_proc):
        meta = load_json(root / "cache" / MANIFEST)
        assert meta["complete"] and meta["spec"]["windows"] == 18 and meta["cpu_s"] > 0
    assert load_json(two_proc / "cache" / MANIFEST)["spec"] == spec
    for i in range(5):
        a, b = shard_path(one_proc / "cache", i), shard_path(two_proc / "cache", i)
        assert a.read_bytes() == b.read_bytes(), i
    assert sorted(p.name for p in (two_proc / "cache").iterdir()) == \
        sorted(p.name for p in (one_proc / "cache").iterdir())


@pytest.mark.parametrize("stage", ["k1", "k2"])
def test_two_processes_train_as_one(two_proc, one_proc, stage):
    a, b = records(one_proc / stage), records(two_proc / stage)   # rank 0 alone logs
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        if "loss" in x:
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-4 + TOL)   # logged rounded
            assert x["reg"] == pytest.approx(y["reg"], abs=TOL)
            assert x["ce"] == pytest.approx(y["ce"], abs=TOL if stage == "k1" else 1e-4 + TOL)
        if "val" in x:      # 6 held-out windows, 3 per rank, gathered
            for tau, v in x["val"].items():
                assert v["windows"] == y["val"][tau]["windows"] == 6
                assert v["per_position"] == pytest.approx(y["val"][tau]["per_position"])


def test_killed_two_process_run_resumes_exactly(two_proc, saved_tiny_model, tiny_corpus,
                                                tmp_path):
    # what a kill right after the step-2 checkpoint leaves: that checkpoint, and metrics lines
    # past it that the resumed run drops and redoes
    run = tmp_path / "k1"
    shutil.copytree(two_proc / "k1", run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    (run / "checkpoints" / "latest.json").write_text('{"name": "step-0000002", "step": 2}')
    cfg = train_cfg(saved_tiny_model, tiny_corpus, run, k=1, cache=str(two_proc / "cache"))
    torchrun([{"train": asdict(cfg), "resume": True}], tmp_path)
    full, resumed = records(two_proc / "k1"), records(run)
    assert [r["step"] for r in full] == [r["step"] for r in resumed]
    for x, y in zip(full, resumed, strict=True):
        assert {k: v for k, v in x.items() if "cpu" not in k} == \
            {k: v for k, v in y.items() if "cpu" not in k}


if __name__ == "__main__":
    with distributed.guard():
        run_jobs(json.loads(Path(sys.argv[1]).read_text()))
