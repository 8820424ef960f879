"""The run directory of a long training job, shared by teacher training (training/teacher.py)
and distillation (training/distill.py):

    out/metrics.jsonl                 one JSON record per step (validation records included)
    out/checkpoints/step-XXXXXXX/     complete checkpoints: written into a temp directory, then
                                      renamed into place, so a crash never leaves half of one
    out/checkpoints/latest.json       {"name": "step-XXXXXXX", "step": N}

Resuming takes the newest readable checkpoint (a corrupt one is skipped with a one-line
message), checks that the config did not change in a field that shapes the run, and rewinds
the metrics to that step. SIGINT / SIGTERM save a checkpoint before the job exits.

In a multi-process run (training/distributed.py) every rank holds a RunDir, but only rank 0's
(main=True) writes: the others read the same checkpoints to resume from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from kforcing.core.config import load_json
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import atomic_write_bytes, atomic_write_json
from kforcing.io.tokens import TokenFile

T = TypeVar("T")
CHECKPOINTS, LATEST, METRICS = "checkpoints", "latest.json", "metrics.jsonl"
TRAINER_TENSORS, TRAINER_JSON = "trainer.safetensors", "trainer.json"   # optimizer, RNG, data


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors (safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
    for name, val in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def check_same_config(saved: dict[str, Any], now: dict[str, Any], free: set[str]) -> None:
    """Refuse to resume when a field outside `free` (those a run may change between sessions,
    e.g. its budget) differs, naming every differing field."""
    diffs = [f"{key} was {saved.get(key)!r}, now {now.get(key)!r}"
             for key in sorted(set(saved) | set(now))
             if key not in free and saved.get(key) != now.get(key)]
    if diffs:
        raise KForcingError(f"cannot resume: {'; '.join(diffs)} (use another --out for a "
                            "different run)")


class MetricsLog:
    """Append-only JSONL metrics of a run; `rewind(step)` drops what a resumed run will redo,
    so the log of an interrupted and resumed run reads like one uninterrupted run."""

    def __init__(self, path: Path, main: bool = True):
        self.path = Path(path)
        self.main = main

    def append(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every complete record (a line cut short by a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def rewind(self, step: int) -> None:
        if not self.main or not self.path.exists():
            return
        keep = [r for r in self.records() if r.get("step", 0) <= step and not r.get("final")]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())


class RunDir:
    """Checkpoints and metrics of one run (see the module docstring)."""

    def __init__(self, root: str | Path, keep: int = 2, main: bool = True):
        self.root = Path(root)
        self.ckpts = self.root / CHECKPOINTS
        self.keep = keep
        self.main = main    # False on ranks > 0 of a multi-process run: they never write
        self.metrics = MetricsLog(self.root / METRICS, main)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first (the one latest.json names leads its step)."""
        if not self.ckpts.is_dir():
            return []
        dirs = sorted((p for p in self.ckpts.glob("step-*") if p.is_dir()),
                      key=lambda p: p.name, reverse=True)
        try:
            named = self.ckpts / load_json(self.ckpts / LATEST)["name"]
        except (KForcingError, KeyError, TypeError):
            named = None
        if named in dirs:
            dirs.remove(named)
            dirs.insert(0, named)
        return dirs

    def has_run(self) -> bool:
        return (self.ckpts / LATEST).exists() or bool(self.checkpoints())

    def start(self, resume: bool) -> None:
        """Before the first step: the directory is writable, and a fresh run does not overwrite
        another (a directory left by a run killed before its first checkpoint is reset)."""
        if not self.main:
            return
        if resume:
            if not self.root.is_dir() or not any(self.root.iterdir()):
                raise KForcingError(f"nothing to resume in {self.root}")
            check_writable(self.root)
            return
        check_writable(self.root)
        if self.has_run():
            raise KForcingError(f"{self.root} already holds a run: pass --resume to continue it "
                                "or choose another --out")
        self.metrics.path.unlink(missing_ok=True)

    def resume(self, read: Callable[[Path], T]) -> tuple[Path, T] | None:
        """read(d) of the newest checkpoint it can read, and d; None when there is none yet.
        An unreadable checkpoint (read raised KForcingError) is skipped with a one-line note."""
        skipped: list[str] = []
        for d in self.checkpoints():
            try:
                data = read(d)
            except KForcingError as e:
                skipped.append(f"{d.name} ({e})")
                continue
            if skipped:
                print(f"kforcing: warning: skipped unreadable checkpoint {'; '.join(skipped)}; "
                      f"resuming from {d.name}", file=sys.stderr)
            return d, data
        if skipped:
            raise KForcingError(f"no readable checkpoint in {self.ckpts}: {'; '.join(skipped)}")
        if self.main:
            print(f"kforcing: note: no checkpoint in {self.root} yet; starting from step 0",
                  file=sys.stderr)
            self.metrics.path.unlink(missing_ok=True)
        return None

    def publish(self, step: int, write: Callable[[Path], None]) -> Path:
        """Rank 0 writes the checkpoint; other ranks only get the path it will have."""
        if not self.main:
            return self.ckpts / f"step-{step:07d}"
        return publish_checkpoint(self.root, step, write, keep=self.keep)


def check_writable(d: Path) -> None:
    """Create d (and its parents) and write a probe file into it, or say why not."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise KForcingError(f"cannot write to the output directory {d}: "
                            f"{e.strerror or e}") from None


def check_corpus(data: Path, block_size: int) -> tuple[TokenFile, TokenFile]:
    """The train and validation splits of a prepared corpus, each holding at least one block of
    block_size + 1 tokens (a job must not die at its first validation)."""
    if not (data / "train.bin").is_file():
        raise KForcingError(f"no prepared corpus in '{data}': run `kforcing data prepare` "
                            "first (it writes train.bin, validation.bin, tokenizer.json)")
    splits = (TokenFile(data / "train.bin"), TokenFile(data / "validation.bin"))
    for split in splits:
        if split.num_blocks(block_size) == 0:
            raise KForcingError(f"{split.path} has {len(split)} tokens, fewer than one block of "
                                f"{block_size + 1}: use a smaller --block-size or re-prepare the "
                                "corpus with more text")
    return splits


def publish_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None],
                       keep: int = 2) -> Path:
    """Write a checkpoint into a temp directory via write(tmp_dir), rename it into place, then
    point checkpoints/latest.json at it. A crash at any moment leaves the previous one intact;
    temp directories left by earlier crashes are removed."""
    ckpt_root = Path(run_dir) / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}."))
    try:
        write(tmp)
        final = ckpt_root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(ckpt_root / LATEST, {"name": name, "step": step})
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


class StopSignal:
    """Set when SIGINT or SIGTERM arrives; the loop saves a checkpoint and stops at the end of
    the step. A second signal stops at once (the last checkpoint is still intact)."""

    def __init__(self):
        self.name: str | None = None

    def __bool__(self) -> bool:
        return self.name is not None

    def _handle(self, signum, frame) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name


@contextmanager
def stop_signals() -> Iterator[StopSignal]:
    stop = StopSignal()
    if threading.current_thread() is not threading.main_thread():
        yield stop            # signal handlers can only be installed in the main thread
        return
    old = {s: signal.signal(s, stop._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def interrupted(stop: StopSignal, step: int, out: Path) -> KeyboardInterrupt:
    name = stop.name or "a stop signal to another rank"
    print(f"kforcing: {name} at step {step}: checkpoint saved in {out}", file=sys.stderr)
    return KeyboardInterrupt()


class Progress:
    """A progress bar against whichever limit stops the run first: the step limit or the time
    budget (in minutes). Its fraction is max(steps / max_steps, minutes / budget)."""

    def __init__(self, desc: str, *, max_steps: int, budget_min: float | None, step: int,
                 minutes: float, enabled: bool):
        self.max_steps, self.budget_min = max_steps, budget_min
        self.bar = tqdm(total=1000, disable=not enabled, desc=desc, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}"
                                   "{postfix}]")
        self.update(step, minutes)

    def fraction(self, step: int, minutes: float) -> float:
        f = step / self.max_steps
        if self.budget_min:
            f = max(f, minutes / self.budget_min)
        return min(1.0, f)

    def describe(self, step: int, minutes: float) -> str:
        if self.budget_min and minutes / self.budget_min >= step / self.max_steps:
            digits = 1 if self.budget_min >= 1 else 2
            return f"{minutes:.{digits}f}/{self.budget_min:g} min, step {step}"
        return f"step {step}/{self.max_steps}"

    def update(self, step: int, minutes: float, **postfix: str) -> None:
        n = math.floor(1000 * self.fraction(step, minutes))
        self.bar.update(n - self.bar.n)
        self.bar.set_postfix_str(", ".join([self.describe(step, minutes),
                                            *(f"{k}={v}" for k, v in postfix.items())]))

    def close(self) -> None:
        self.bar.close()
