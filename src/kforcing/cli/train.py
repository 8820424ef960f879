"""`kforcing train`: pretrain an AR teacher (kforcing.training.teacher)."""

from __future__ import annotations

import sys

from kforcing.cli.common import (
    config_flags,
    config_values,
    count,
    default_of,
    device_flag,
    key_value,
    load_config,
    natural,
    non_negative,
    path,
    positive,
    print_json,
)
from kforcing.core.config import TrainConfig, from_dict
from kforcing.training import distributed
from kforcing.training.distributed import launch, without_nproc
from kforcing.training.teacher import train


def train_config(args) -> TrainConfig:
    """The run's config: the --config file, then every flag the user set."""
    base = load_config(args.config) if args.config else {}
    overrides = config_values(TrainConfig, args)
    if args.override:
        overrides["model_overrides"] = dict(key_value(s) for s in args.override)
    return from_dict(TrainConfig, {**base, **overrides})


def cmd_train(args) -> None:
    if args.nproc:
        raise SystemExit(launch(args.nproc, without_nproc(sys.argv[1:])))
    with distributed.guard():
        result = train(train_config(args), resume=args.resume, progress=not args.quiet)
    if distributed.env_context().main:
        print_json(result)


def add_parser(sub) -> None:
    sp = sub.add_parser("train", help="pretrain an AR teacher")
    sp.add_argument("--data", type=path, help="prepared corpus directory")
    sp.add_argument("--out", dest="out_dir", type=path,
                    help=f"run directory (default: {default_of(TrainConfig, 'out_dir')})")
    sp.add_argument("--model", help="model preset: tiny, small, base (default: "
                    f"{default_of(TrainConfig, 'model')})")
    sp.add_argument("--config", type=path, help="JSON file with TrainConfig fields")
    sp.add_argument("--override", action="append", help="model config key=value (repeatable)")
    config_flags(sp, TrainConfig, {
        "block_size": count, "batch_size": count, "grad_accum": count, "max_steps": count,
        "time_budget_min": positive, "lr": positive, "min_lr": non_negative,
        "warmup_steps": natural, "eval_every": count, "eval_batches": count,
        "ckpt_every": count, "seed": natural, "threads": count})
    sp.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    device_flag(sp, default=None)
    sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    sp.add_argument("--nproc", type=count, help="data-parallel processes: re-run this command "
                    "under torchrun with N processes (docs/DISTRIBUTED.md)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(run=cmd_train)
