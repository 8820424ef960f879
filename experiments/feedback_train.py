"""Runs of the token-feedback student (issue 11): the teacher cache and the training stages.

    python experiments/feedback_train.py cache --teacher T --data D --out runs/fb/cache
    python experiments/feedback_train.py train --teacher T --data D --k 1 --cache runs/fb/cache \
        --out runs/fb/s1 --budget-min 20 [--resume]
    python experiments/feedback_train.py train ... --k 2 --init runs/fb/s1 --out runs/fb/k2

Every run is resumable (--resume; the cache resumes by itself) and writes metrics.jsonl with
in-run validation against CPU-minutes. See experiments/feedback_chain.sh for the whole chain.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, resolve_model_dir
from kforcing.students.feedback import FeedbackConfig
from kforcing.training.feedback import FeedbackTrainConfig, FeedbackTrainer
from kforcing.training.feedback_cache import CacheSpec, build_teacher_cache


def cache(a: argparse.Namespace) -> None:
    tdir = resolve_model_dir(a.teacher)
    spec = CacheSpec(teacher=str(tdir.resolve()),
                     tokens=str((Path(a.data) / "train.bin").resolve()),
                     block_size=a.block_size, top_n=a.top_n, windows=a.windows,
                     shard_windows=a.shard_windows, seed=a.seed, bf16=a.bf16)
    out = build_teacher_cache(load_model(tdir), spec, a.out, batch_size=a.batch_size,
                              progress=not a.quiet)
    print(json.dumps({"cache": str(out), **json.loads((out / "manifest.json").read_text())}))


def train(a: argparse.Namespace) -> None:
    student = FeedbackConfig(max_k=a.max_k, draft_layers=a.draft_layers,
                             draft_vocab_size=a.draft_vocab, coupling=a.coupling,
                             tau_min=a.tau_min, tau_max=a.tau_max)
    cfg = FeedbackTrainConfig(
        teacher=a.teacher, data=a.data, out_dir=a.out, k=a.k, cache=a.cache, init=a.init,
        student=student, batch_size=a.batch_size, context=a.context, anchors=a.anchors,
        lr=a.lr, min_lr=a.min_lr, reg_weight=a.reg_weight, time_budget_min=a.budget_min,
        eval_every_min=a.eval_every_min, eval_windows=a.eval_windows,
        eval_context=a.eval_context, eval_k=a.eval_k, ckpt_every=a.ckpt_every, bf16=a.bf16,
        seed=a.seed, threads=a.threads)
    rec = FeedbackTrainer(cfg, resume=a.resume, progress=not a.quiet).fit()
    print(json.dumps({"config": asdict(cfg), "final": rec}, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("cache", "train"):
        s = sub.add_parser(name)
        s.add_argument("--teacher", required=True)
        s.add_argument("--data", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--bf16", action="store_true")
        s.add_argument("--quiet", action="store_true")
        s.add_argument("--threads", type=int, default=1)
    c = sub.choices["cache"]
    c.add_argument("--block-size", type=int, default=256)
    c.add_argument("--top-n", type=int, default=128)
    c.add_argument("--windows", type=int, default=4096)
    c.add_argument("--shard-windows", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=16)
    t = sub.choices["train"]
    t.add_argument("--k", type=int, default=1)
    t.add_argument("--cache")
    t.add_argument("--init")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--max-k", type=int, default=4)
    t.add_argument("--draft-layers", type=int, default=1)
    t.add_argument("--draft-vocab", type=int, default=None)
    t.add_argument("--coupling", default="gumbel")
    t.add_argument("--tau-min", type=float, default=0.7)
    t.add_argument("--tau-max", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--context", type=int, default=128)
    t.add_argument("--anchors", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr", type=float, default=2e-4)
    t.add_argument("--reg-weight", type=float, default=1.0)
    t.add_argument("--budget-min", type=float, default=None)
    t.add_argument("--eval-every-min", type=float, default=3.0)
    t.add_argument("--eval-windows", type=int, default=256)
    t.add_argument("--eval-context", type=int, default=128)
    t.add_argument("--eval-k", type=int, default=4)
    t.add_argument("--ckpt-every", type=int, default=100)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        {"cache": cache, "train": train}[a.cmd](a)
    except KForcingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
