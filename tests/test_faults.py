"""Fault tests for the long jobs (issue 13): `kforcing train` and `kforcing distill` killed
with SIGKILL at random points, including in the middle of a checkpoint write, then resumed
with `--resume`: the run continues from the last complete checkpoint and ends with the same
metrics as an uninterrupted run. A corrupt latest checkpoint falls back to the previous one
with a one-line message.

The killed jobs run in subprocesses (`tests/_fault_runner` below wraps `kforcing.cli.main`,
adding a kill switch on the N-th checkpoint write: the library has no fault hooks). The
default tests kill twice (one train, one distill); `-m slow` runs the sweep: many kill points
and several kills per run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kforcing.cli.main import main

# Runs `kforcing ...` and SIGKILLs itself at the N-th write of kind FAULT_KIND:
#   tensors: the N-th safetensors file, after half of its bytes reached the disk;
#   latest:  the N-th update of checkpoints/latest.json (the checkpoint directory is in place,
#            the pointer still names the previous one).
FAULT_RUNNER = """
import os, signal, sys
from kforcing.io import checkpoint
from kforcing.training import rundir

kind, at = os.environ.get("FAULT_KIND", ""), int(os.environ.get("FAULT_AT", "0"))
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save = checkpoint.save_file
def save_file(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    if kind == "tensors":
        calls[0] += 1
        if calls[0] == at:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            die()
checkpoint.save_file = save_file

real_json = rundir.atomic_write_json
def atomic_write_json(path, obj):
    if kind == "latest" and os.path.basename(str(path)) == "latest.json":
        calls[0] += 1
        if calls[0] == at:
            die()
    real_json(path, obj)
rundir.atomic_write_json = atomic_write_json

from kforcing.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
TIMINGS = ("elapsed_s", "tokens_per_s", "minutes")


def write_config(path: Path, **cfg) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def train_config(tmp: Path, corpus, out: Path, **kw) -> Path:
    return write_config(tmp / "train.json", **{
        "data": str(corpus.dir), "out_dir": str(out), "model": "tiny", "block_size": 16,
        "batch_size": 4, "max_steps": 12, "warmup_steps": 2, "eval_every": 4, "eval_batches": 2,
        "ckpt_every": 2, "keep_checkpoints": 2, "seed": 0,
        "model_overrides": {"dropout": 0.1}, **kw})


def distill_config(tmp: Path, teacher: Path, corpus, out: Path, **kw) -> Path:
    return write_config(tmp / "distill.json", **{
        "teacher": str(teacher), "data": str(corpus.dir), "out_dir": str(out), "k": 1,
        "student": {"max_k": 2}, "block_size": 16, "windows": 4, "batch_size": 2,
        "max_steps": 8, "time_budget_min": None, "eval_every_min": 1000.0, "eval_contexts": 8,
        "ckpt_every": 2, "seed": 0, **kw})


def spawn(tmp: Path, command: str, config: Path, *extra: str, kind: str = "",
          at: int = 0) -> subprocess.Popen:
    runner = tmp / "fault_runner.py"
    runner.write_text(FAULT_RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_KIND": kind, "FAULT_AT": str(at)}
    with (tmp / "stderr.txt").open("a") as err:   # a file: a full pipe cannot stall the job
        return subprocess.Popen([sys.executable, str(runner), command, "--config", str(config),
                                 "--quiet", *extra], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)


def stderr_of(tmp: Path) -> str:
    return (tmp / "stderr.txt").read_text()[-4000:]


def steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum('"loss"' in line for line in lines)


def kill_after(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 600) -> None:
    """SIGKILL the job once it has logged `steps` training steps (or when it is done)."""
    end = time.monotonic() + timeout
    while proc.poll() is None and steps_logged(out) < steps and time.monotonic() < end:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), stderr_of(out.parent)


def records(out: Path) -> list[dict]:
    """The metrics of a run without timings, complete lines only."""
    out_recs = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out_recs.append({k: v for k, v in rec.items() if k not in TIMINGS})
    return out_recs


def run_in_process(command: str, config: Path, *extra: str) -> int:
    return main([command, "--config", str(config), "--quiet", *extra])


def resume_until_done(command: str, config: Path) -> None:
    assert run_in_process(command, config, "--resume") == 0


@pytest.fixture(scope="module")
def train_reference(tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults-train")
    out = tmp / "run"
    assert run_in_process("train", train_config(tmp, tiny_corpus, out)) == 0
    return out, records(out)


@pytest.fixture(scope="module")
def distill_reference(saved_tiny_model, tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults-distill")
    out = tmp / "run"
    assert run_in_process("distill", distill_config(tmp, saved_tiny_model, tiny_corpus, out)) == 0
    return out, records(out)


def assert_resumable(out: Path) -> None:
    """Whatever the kill left: no half checkpoint is published."""
    ckpts = out / "checkpoints"
    if (ckpts / "latest.json").is_file():
        assert (ckpts / json.loads((ckpts / "latest.json").read_text())["name"]).is_dir()


# -- default: one kill each ------------------------------------------------------------------------

def test_train_killed_during_a_checkpoint_write_resumes_to_the_same_end(
        train_reference, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    cfg = train_config(tmp_path, tiny_corpus, out)
    # tensor writes 1-2: checkpoint step 2; write 5 is the model of step 6, cut in half
    proc = spawn(tmp_path, "train", cfg, kind="tensors", at=5)
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, stderr_of(tmp_path)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert_resumable(out)
    resume_until_done("train", cfg)
    assert records(out) == train_reference[1]


def test_distill_killed_at_a_random_step_resumes_to_the_same_end(
        distill_reference, saved_tiny_model, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    cfg = distill_config(tmp_path, saved_tiny_model, tiny_corpus, out)
    kill_after(spawn(tmp_path, "distill", cfg), out, random.Random(0).randint(3, 6))
    assert_resumable(out)
    resume_until_done("distill", cfg)
    assert records(out) == distill_reference[1]


def test_cli_resume_skips_a_corrupt_latest_checkpoint_in_one_line(
        train_reference, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(train_reference[0], out)      # checkpoints of steps 10 and 12
    weights = out / "checkpoints" / "step-0000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert run_in_process("train", train_config(tmp_path, tiny_corpus, out), "--resume") == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("kforcing: warning:")
    assert "step-0000012" in err[0] and "resuming from step-0000010" in err[0]
    assert records(out) == train_reference[1]


# -- the sweep -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind, at", [("tensors", n) for n in range(1, 13)] +
                         [("latest", n) for n in range(1, 6)])
def test_train_killed_at_every_write(train_reference, tiny_corpus, tmp_path, kind, at):
    out = tmp_path / "run"
    cfg = train_config(tmp_path, tiny_corpus, out)
    proc = spawn(tmp_path, "train", cfg, kind=kind, at=at)
    proc.wait(timeout=600)
    assert proc.returncode in (0, -signal.SIGKILL), stderr_of(tmp_path)
    assert_resumable(out)
    if proc.returncode != 0:
        resume_until_done("train", cfg)
    assert records(out) == train_reference[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind, at", [("tensors", n) for n in range(1, 9)] +
                         [("latest", n) for n in range(1, 5)])
def test_distill_killed_at_every_write(distill_reference, saved_tiny_model, tiny_corpus,
                                       tmp_path, kind, at):
    out = tmp_path / "run"
    cfg = distill_config(tmp_path, saved_tiny_model, tiny_corpus, out)
    proc = spawn(tmp_path, "distill", cfg, kind=kind, at=at)
    proc.wait(timeout=600)
    assert proc.returncode in (0, -signal.SIGKILL), stderr_of(tmp_path)
    assert_resumable(out)
    if proc.returncode != 0:
        resume_until_done("distill", cfg)
    assert records(out) == distill_reference[1]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("seed", range(4))
def test_killed_again_and_again_at_random_steps(train_reference, distill_reference,
                                                saved_tiny_model, tiny_corpus, tmp_path,
                                                command, seed):
    """Kill -9, resume (in a subprocess, killed too), ... until the run finishes."""
    out = tmp_path / "run"
    if command == "train":
        cfg, reference, total = train_config(tmp_path, tiny_corpus, out), train_reference, 12
    else:
        cfg = distill_config(tmp_path, saved_tiny_model, tiny_corpus, out)
        reference, total = distill_reference, 8
    rng = random.Random(seed)
    for _ in range(3):
        started = out.is_dir() and any(out.iterdir())
        proc = spawn(tmp_path, command, cfg, *(("--resume",) if started else ()))
        kill_after(proc, out, rng.randint(1, total))
        assert_resumable(out)
        if proc.returncode == 0:
            break
    else:
        resume_until_done(command, cfg)
    assert records(out) == reference[1]
