"""The run directory both trainers share: resume with a config check naming every differing
field, a corrupt latest checkpoint skipped with one line, SIGINT / SIGTERM saving a checkpoint,
pre-flight checks before the first step, and a progress bar against the limit that stops the
run. (Kill -9 faults, in subprocesses: tests/test_faults.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from kforcing.core.config import TrainConfig
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import save_model
from kforcing.io.tokens import write_token_file
from kforcing.students.pushforward import StudentConfig
from kforcing.training.distill import DistillConfig, Distiller
from kforcing.training.rundir import MetricsLog, Progress, RunDir, check_same_config
from kforcing.training.teacher import Trainer


def train_cfg(corpus_dir, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus_dir), out_dir=str(out), model="tiny", block_size=16,
                batch_size=4, max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=4,
                eval_batches=2, ckpt_every=2, keep_checkpoints=2, seed=0)
    return TrainConfig(**{**base, **kw})


def distill_cfg(teacher, corpus_dir, out: Path, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), data=str(corpus_dir), out_dir=str(out), k=1,
                student=StudentConfig(max_k=2), block_size=16, windows=4, batch_size=2,
                max_steps=4, time_budget_min=None, eval_every_min=0.0, eval_contexts=8,
                ckpt_every=2)
    return DistillConfig(**{**base, **kw})


def losses(out: Path) -> dict[int, float]:
    recs = MetricsLog(out / "metrics.jsonl").records()
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def metrics(rec: dict) -> dict:
    """A record without its timings (elapsed seconds, throughput)."""
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "tokens_per_s", "minutes")}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def full(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("rundir") / "full"
    t = Trainer(train_cfg(tiny_corpus.dir, out), progress=False)
    last = t.fit()
    return out, last, weights(t.model)


# -- resume --------------------------------------------------------------------------------------

def test_config_check_names_every_differing_field():
    with pytest.raises(KForcingError) as e:
        check_same_config({"lr": 1.0, "seed": 0, "max_steps": 5}, {"lr": 2.0, "seed": 1,
                                                                   "max_steps": 9}, {"max_steps"})
    msg = str(e.value)
    assert "lr was 1.0, now 2.0" in msg and "seed was 0, now 1" in msg
    assert "max_steps" not in msg and "\n" not in msg
    check_same_config({"a": 1, "b": 2}, {"a": 1, "b": 3}, {"b"})


def test_both_trainers_check_their_config_on_resume(full, tiny_corpus, saved_tiny_model,
                                                    tmp_path):
    out, _, _ = full
    with pytest.raises(KForcingError, match="cannot resume: lr was 0.003, now 0.001"):
        Trainer(train_cfg(tiny_corpus.dir, out, lr=1e-3), resume=True, progress=False)
    # a budget may change between sessions
    Trainer(train_cfg(tiny_corpus.dir, out, max_steps=20, eval_every=1), resume=True,
            progress=False)
    d_out = tmp_path / "d"
    Distiller(distill_cfg(saved_tiny_model, tiny_corpus.dir, d_out), progress=False).fit(
        stop_after=2)
    with pytest.raises(KForcingError, match="cannot resume: .*windows was 4, now 8"):
        Distiller(distill_cfg(saved_tiny_model, tiny_corpus.dir, d_out, windows=8), resume=True,
                  progress=False)
    d = Distiller(distill_cfg(saved_tiny_model, tiny_corpus.dir, d_out, max_steps=6),
                  resume=True, progress=False)
    assert d.step == 2


@pytest.mark.parametrize("damage", ["weights", "trainer", "latest.json", "missing"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(full, tiny_corpus, tmp_path,
                                                              capfd, damage):
    """issue 13 item 8: --resume on a corrupt latest checkpoint takes the previous intact one
    with a one-line message, and the run still ends exactly like the uninterrupted one."""
    full_out, full_last, full_weights = full
    out = tmp_path / "run"
    cfg = train_cfg(tiny_corpus.dir, out)
    Trainer(cfg, progress=False).fit(stop_after=6)
    latest = out / "checkpoints" / "step-0000006"
    if damage == "weights":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "trainer":
        (latest / "trainer.json").write_text('{"step": 6, "elapsed"')
    elif damage == "latest.json":      # the pointer itself is torn: newest complete dir wins
        (out / "checkpoints" / "latest.json").write_text('{"na')
    else:
        (latest / "trainer.safetensors").unlink()
    capfd.readouterr()
    t = Trainer(cfg, resume=True, progress=False)
    err = capfd.readouterr().err
    if damage == "latest.json":
        assert t.step == 6 and err == ""
    else:
        assert t.step == 4
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "step-0000006" in lines[0] and "step-0000004" in lines[0]
    last = t.fit()
    assert metrics(last) == metrics(full_last)
    assert losses(out) == losses(full_out)
    assert all(torch.equal(v, full_weights[k]) for k, v in t.model.state_dict().items())


def test_no_readable_checkpoint_is_one_line(full, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full[0], out)
    for d in (out / "checkpoints").glob("step-*"):
        (d / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(KForcingError, match="no readable checkpoint") as e:
        Trainer(train_cfg(tiny_corpus.dir, out), resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_resume_before_the_first_checkpoint_starts_over(tiny_corpus, tmp_path, capfd):
    """A run killed before its first checkpoint leaves only metrics: --resume starts it again
    (a run directory is never left unresumable), and a fresh run there is allowed too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    t = Trainer(train_cfg(tiny_corpus.dir, out, max_steps=2), resume=True, progress=False)
    assert t.step == 0 and "starting from step 0" in capfd.readouterr().err
    t.fit()
    assert sorted(losses(out)) == [1, 2] and losses(out)[1] != 9.0


def test_metrics_rewind_skips_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 5):
        log.append({"step": s})
    with log.path.open("a") as f:
        f.write('{"step": 5, "lo')              # killed mid-append
    log.rewind(3)
    assert log.records() == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_publish_removes_temp_dirs_of_a_crashed_write(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "checkpoints" / ".step-0000002.abc").mkdir(parents=True)
    run.publish(2, lambda d: (d / "x").write_text("1"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json", "step-0000002"]


# -- signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_then_stops(full, tiny_corpus, tmp_path, capfd, sig):
    """issue 13 item 8: SIGINT (and SIGTERM) save the steps done so far."""
    full_out, full_last, _ = full
    out = tmp_path / "run"
    # what the run must restore: Python's default, or SIG_IGN when the suite was started in
    # the background by a shell without job control
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    t = Trainer(train_cfg(tiny_corpus.dir, out, ckpt_every=4), progress=False)
    step = t.train_step

    def step_then_signal():
        loss = step()
        if t.step == 3:
            os.kill(os.getpid(), sig)
        return loss

    t.train_step = step_then_signal
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert signal.Signals(sig).name in capfd.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    resumed = Trainer(train_cfg(tiny_corpus.dir, out, ckpt_every=4), resume=True,
                      progress=False)
    assert resumed.step == 3
    assert metrics(resumed.fit()) == metrics(full_last) and losses(out) == losses(full_out)


def test_signal_stops_a_distillation_stage_with_a_checkpoint(saved_tiny_model, tiny_corpus,
                                                             tmp_path):
    out = tmp_path / "d"
    d = Distiller(distill_cfg(saved_tiny_model, tiny_corpus.dir, out, ckpt_every=10),
                  progress=False)
    step = d.train_step

    def step_then_signal():
        rec = step()
        if d.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return rec

    d.train_step = step_then_signal
    with pytest.raises(KeyboardInterrupt):
        d.fit()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 1


# -- pre-flight ----------------------------------------------------------------------------------

@pytest.fixture
def no_validation(tiny_corpus, tmp_path) -> Path:
    """The tiny corpus with an empty validation split (what `data prepare` made of one book)."""
    d = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.dir, d)
    write_token_file(d / "validation.bin", [np.zeros(0, dtype=np.int64)], vocab_size=300,
                     num_documents=0)
    return d


def test_trainers_refuse_an_empty_validation_split_before_the_first_step(
        no_validation, saved_tiny_model, tmp_path):
    """issue 13 item 1: training used to run a whole eval interval, then die on it."""
    with pytest.raises(KForcingError, match="validation.bin has 0 tokens") as e:
        Trainer(train_cfg(no_validation, tmp_path / "t"), progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(KForcingError, match="validation.bin has 0 tokens"):
        Distiller(distill_cfg(saved_tiny_model, no_validation, tmp_path / "d"), progress=False)
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()


def test_trainers_refuse_an_unwritable_output_dir(tiny_corpus, saved_tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(KForcingError, match="cannot write to the output directory"):
        Trainer(train_cfg(tiny_corpus.dir, blocker / "run"), progress=False)
    with pytest.raises(KForcingError, match="cannot write to the output directory"):
        Distiller(distill_cfg(saved_tiny_model, tiny_corpus.dir, blocker / "run"),
                  progress=False)


def test_distill_refuses_a_block_size_past_the_teachers_context(saved_tiny_model, tiny_corpus,
                                                                tmp_path):
    # the tiny teacher has a context of 32; a window of k tokens sits after the block
    with pytest.raises(KForcingError, match="block_size 31 \\+ k 2 exceeds the teacher's "
                                            "context 32"):
        Distiller(distill_cfg(saved_tiny_model, tiny_corpus.dir, tmp_path, block_size=31, k=2,
                              target="ar-rollout"), progress=False)


def test_distill_refuses_data_of_a_larger_vocabulary(tiny_corpus, make_model, tmp_path):
    teacher = save_model(make_model(vocab_size=256, max_seq_len=32), tmp_path / "small-vocab")
    with pytest.raises(KForcingError, match="vocabulary of 3\\d\\d, more than the teacher's 256"):
        Distiller(distill_cfg(teacher, tiny_corpus.dir, tmp_path / "d"), progress=False)
    assert not (tmp_path / "d").exists()


def test_smoke_run_of_three_steps(tiny_corpus, tmp_path):
    """issue 13 item 7: `train --max-steps 3` used to fail on the default warmup."""
    cfg = TrainConfig(data=str(tiny_corpus.dir), out_dir=str(tmp_path / "t"), model="tiny",
                      block_size=16, batch_size=2, max_steps=3)
    assert cfg.warmup_steps == TrainConfig().warmup_steps > 3
    last = Trainer(cfg, progress=False).fit()
    assert last["step"] == 3 and np.isfinite(last["val_loss"])


# -- progress ------------------------------------------------------------------------------------

def test_progress_follows_the_limit_that_stops_the_run():
    """issue 10: a time-budgeted run showed "steps of 100000" with an ETA of 58 hours."""
    timed = Progress("x", max_steps=100_000, budget_min=10.0, step=40, minutes=3.0,
                     enabled=False)
    assert timed.fraction(40, 3.0) == pytest.approx(0.3)
    assert timed.describe(40, 3.0) == "3.0/10 min, step 40"
    short = Progress("x", max_steps=50, budget_min=10.0, step=40, minutes=1.0, enabled=False)
    assert short.fraction(40, 1.0) == pytest.approx(0.8)
    assert short.describe(40, 1.0) == "step 40/50"
    steps = Progress("x", max_steps=200, budget_min=None, step=50, minutes=99.0, enabled=False)
    assert steps.fraction(50, 99.0) == 0.25 and steps.describe(50, 99.0) == "step 50/200"
