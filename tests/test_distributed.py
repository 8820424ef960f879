"""Data-parallel training (kforcing.training.distributed, docs/DISTRIBUTED.md): 2 gloo processes
under torchrun against 1 process with the same global batch and seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kforcing.core.config import ModelConfig, TrainConfig
from kforcing.core.model import Transformer
from kforcing.io.checkpoint import save_model
from kforcing.io.tokens import write_token_file
from kforcing.training import distributed
from kforcing.training.distill import DistillConfig, Distiller
from kforcing.training.rundir import RunDir
from kforcing.training.teacher import Trainer

TOL = 1e-5
TRAIN = dict(model="tiny", block_size=16, batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3,
             min_lr=3e-4, eval_every=3, eval_batches=2, ckpt_every=3, seed=0)


def torchrun(argv: list[str], nproc: int = 2, program=("-m", "kforcing")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(distributed.torchrun_command(nproc, argv, program), env=env,
                          capture_output=True, text=True, timeout=120)


def flags(cfg: dict) -> list[str]:
    out = []
    for key, value in cfg.items():
        if key == "model_overrides":
            out += [f"--override={k}={v}" for k, v in value.items()]
        else:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r and not r.get("final")}


def test_shards_are_disjoint_and_cover_the_batch():
    batch = list(range(100, 112))
    for world in (1, 2, 3, 4, 6):
        parts = [distributed.shard(batch, distributed.Context(r, world)) for r in range(world)]
        assert sorted(i for p in parts for i in p) == batch
        assert all(len(p) == len(batch) // world for p in parts)
    with pytest.raises(Exception, match="does not split evenly"):
        distributed.shard(batch, distributed.Context(0, 5))


def test_only_the_main_rank_writes(tmp_path):
    run = RunDir(tmp_path / "run", main=False)
    run.start(resume=False)
    run.metrics.append({"step": 1})
    run.publish(1, lambda d: (d / "x").write_text("x"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def two_proc_train(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "train2"
    cfg = {**TRAIN, "model_overrides": {"dropout": 0.1}}
    proc = torchrun(["train", "--data", str(tiny_corpus.dir), "--out", str(out), "--quiet",
                     *flags(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_two_processes_match_one(tiny_corpus, tmp_path):
    cfg = {**TRAIN, "max_steps": 3, "model_overrides": {"dropout": 0.0}}
    one = Trainer(TrainConfig(data=str(tiny_corpus.dir), out_dir=str(tmp_path / "one"), **cfg),
                  progress=False)
    one.fit()
    proc = torchrun(["train", "--data", str(tiny_corpus.dir), "--out", str(tmp_path / "two"),
                     "--quiet", *flags(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert abs(a[step] - b[step]) < TOL, (step, a[step], b[step])


def test_killed_two_process_run_resumes_exactly(two_proc_train, tiny_corpus, tmp_path):
    # the on-disk state a kill right after the step-3 checkpoint leaves: that checkpoint, and
    # metrics lines past it that the resumed run must drop and redo (dropout draws per rank)
    run = tmp_path / "killed"
    shutil.copytree(two_proc_train, run)
    for d in (run / "checkpoints").glob("step-*"):
        if d.name != "step-0000003":
            shutil.rmtree(d)
    (run / "checkpoints" / "latest.json").write_text('{"name": "step-0000003", "step": 3}')
    cfg = {**TRAIN, "model_overrides": {"dropout": 0.1}}
    proc = torchrun(["train", "--data", str(tiny_corpus.dir), "--out", str(run), "--quiet",
                     "--resume", *flags(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = records(two_proc_train), records(run)
    assert [r["step"] for r in full] == [r["step"] for r in resumed]
    for x, y in zip(full, resumed, strict=True):
        assert x["loss"] == y["loss"] and x.get("val_loss") == y.get("val_loss")


def test_a_failing_rank_stops_the_run_with_one_message(tiny_corpus, tmp_path):
    argv = ["train", "--data", str(tiny_corpus.dir), "--out", str(tmp_path / "run"), "--quiet",
            *flags({**TRAIN, "model_overrides": {"dropout": 0.0}})]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from kforcing.training.distributed import launch; "
         "sys.exit(launch(2, sys.argv[1:], [sys.argv[0]]))".replace("sys.argv[0]", repr(
             str(Path(__file__).with_name("_ddp_fail.py")))), *argv],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["kforcing: error: (rank 1 of 2) injected failure: rank 1 cannot read its "
                     "shard", "kforcing: error: the 2-process run failed (exit 1)"], proc.stderr


def test_distill_two_processes_match_one(saved_tiny_model, tiny_corpus, tmp_path):
    cfg = dict(teacher=str(saved_tiny_model), data=str(tiny_corpus.dir), k=1, block_size=16,
               windows=8, batch_size=4, max_steps=3, time_budget_min=None, warmup_steps=2,
               eval_every_min=1000.0, eval_contexts=8, ckpt_every=2, seed=0)
    one = Distiller(DistillConfig(**cfg, out_dir=str(tmp_path / "one")), progress=False)
    one.fit()
    config = tmp_path / "stage.json"
    config.write_text(json.dumps({**cfg, "out_dir": str(tmp_path / "two")}))
    proc = torchrun(["distill", "--config", str(config), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 3]
    for x, y in zip(a, b, strict=True):
        if "loss" in x:
            assert abs(x["loss"] - y["loss"]) < TOL, (x, y)
            assert x["match"] == pytest.approx(y["match"], abs=1e-3)
        if "val" in x:
            assert json.dumps(x["val"]) == json.dumps(y["val"]) or x["val"] == pytest.approx(
                y["val"], abs=1e-3)


# -- the GPU recipes (docs/DISTRIBUTED.md): every config builds its models and takes two steps
# on CPU, with a random teacher of the real architecture and tiny batches. The 1B Llama teacher
# has 2 of its 16 blocks here: all 16 (teacher + student + AdamW state, fp32) need ~25 GiB.
ARCHITECTURES = {
    "smollm2": dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, dim=576,
                    intermediate_size=1536, max_seq_len=1024, rope_theta=100000.0),
    "llama1b": dict(vocab_size=128256, n_layer=2, n_head=32, n_kv_head=8, dim=2048,
                    intermediate_size=8192, max_seq_len=1024, rope_theta=500000.0),
}
CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = {"smollm2_gpu.json": "smollm2", "smollm2_8gpu.json": "smollm2",
           "llama1b_1gpu.json": "llama1b", "llama1b_8gpu.json": "llama1b"}


def test_every_recipe_in_the_docs_is_tested():
    docs = (Path(__file__).parents[1] / "docs" / "DISTRIBUTED.md").read_text()
    named = {name for name in os.listdir(CONFIGS) if f"configs/{name}" in docs
             and "_feedback" not in name}     # tests/test_feedback_recipes.py tests those
    assert named == set(RECIPES)
    for name in RECIPES:
        DistillConfig(**{k: v for k, v in json.loads((CONFIGS / name).read_text()).items()})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_dry_run(name, tmp_path):
    arch = ModelConfig(**ARCHITECTURES[RECIPES[name]])
    torch.manual_seed(0)
    save_model(Transformer(arch), tmp_path / "teacher")
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        write_token_file(tmp_path / "data" / f"{split}.bin",
                         [rng.integers(0, arch.vocab_size, 2000)], vocab_size=arch.vocab_size,
                         num_documents=1)
    cfg = json.loads((CONFIGS / name).read_text())
    for k in (1, 2):       # a first stage, then a self-forcing stage from it
        cfg.update(teacher=str(tmp_path / "teacher"), data=str(tmp_path / "data"),
                   out_dir=str(tmp_path / f"k{k}"), k=k, device="cpu", batch_size=2,
                   block_size=16, windows=4, eval_contexts=2, max_steps=2,
                   time_budget_min=None, eval_every_min=1000.0, ckpt_every=1000,
                   init=str(tmp_path / "k1") if k == 2 else None)
        rec = Distiller(DistillConfig(**cfg), progress=False).fit()
        assert rec["step"] == 2
