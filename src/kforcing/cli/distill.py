"""`kforcing distill` (one K-Forcing stage: AR -> k=1 -> 2 -> 4) and `kforcing curves` (its
learning curves)."""

from __future__ import annotations

import sys

from kforcing.cli.common import (
    config_flags,
    config_values,
    count,
    default_of,
    device_flag,
    load_config,
    natural,
    path,
    positive,
    print_json,
)
from kforcing.core.config import from_dict
from kforcing.core.sampling import CDF_ORDERS
from kforcing.evaluation.curves import plot_curves, summarize
from kforcing.students.pushforward import HEADS, LAYOUTS, StudentConfig
from kforcing.training import distributed
from kforcing.training.distill import TARGETS, DistillConfig, distill, stage_student_config
from kforcing.training.distributed import launch, without_nproc

STUDENT_FLAGS = ("max_k", "layout", "head", "cdf_order")


def distill_config(args) -> DistillConfig:
    """The stage's config: the --config file, then every flag the user set; a stage started
    with --init inherits the init student's layout, head and CDF order."""
    base = load_config(args.config) if args.config else {}
    flags = config_values(DistillConfig, args)
    student = {**base.pop("student", {}),
               **{k: getattr(args, k) for k in STUDENT_FLAGS if getattr(args, k) is not None}}
    init = flags.get("init", base.get("init"))
    return from_dict(DistillConfig, {**base, **flags,
                                     "student": stage_student_config(init, student)})


def cmd_distill(args) -> None:
    if args.nproc:
        raise SystemExit(launch(args.nproc, without_nproc(sys.argv[1:])))
    with distributed.guard():
        result = distill(distill_config(args), resume=args.resume, progress=not args.quiet)
    if distributed.env_context().main:
        print_json(result)


def cmd_curves(args) -> None:
    plot_curves(args.runs, args.out, tau=args.tau, metric=args.metric, title=args.title)
    print_json(summarize(args.runs))


def add_parser(sub) -> None:
    sp = sub.add_parser("distill", help="one K-Forcing distillation stage (AR -> k=1 -> 2 -> 4)")
    sp.add_argument("--teacher", type=path, help="teacher model or run directory")
    sp.add_argument("--data", type=path, help="prepared corpus directory")
    sp.add_argument("--out", dest="out_dir", type=path, help="stage output directory (default: "
                    f"{default_of(DistillConfig, 'out_dir')})")
    sp.add_argument("--init", type=path, help="previous stage's student (self-forcing stages)")
    sp.add_argument("--config", type=path, help="JSON file with DistillConfig fields")
    config_flags(sp, DistillConfig, {"k": count})
    config_flags(sp, StudentConfig, {"max_k": count})
    sp.add_argument("--layout", choices=LAYOUTS,
                    help=f"default: {default_of(StudentConfig, 'layout')}")
    sp.add_argument("--head", choices=HEADS, help=f"default: {default_of(StudentConfig, 'head')}")
    sp.add_argument("--cdf-order", dest="cdf_order", choices=CDF_ORDERS,
                    help=f"default: {default_of(StudentConfig, 'cdf_order')}")
    sp.add_argument("--target", choices=TARGETS,
                    help=f"default: {default_of(DistillConfig, 'target')}")
    config_flags(sp, DistillConfig, {
        "tau_min": positive, "tau_max": positive, "tau_start": positive, "tau_ramp": positive,
        "block_size": count, "windows": count, "batch_size": count, "lr": positive,
        "noise_lr": positive, "max_steps": count, "time_budget_min": positive,
        "eval_every_min": positive, "eval_contexts": count, "ckpt_every": count,
        "seed": natural})
    # imported teachers on small hardware (docs/TEACHERS.md)
    sp.add_argument("--data-free", dest="data_free", action="store_true", default=None,
                    help="no corpus: distill on the teacher's own samples (cached)")
    config_flags(sp, DistillConfig, {"data_free_tokens": count, "train_last_blocks": natural})
    sp.add_argument("--grad-checkpoint", dest="grad_checkpoint", action="store_true",
                    default=None, help="recompute activations in backward (less memory)")
    device_flag(sp, default=None)
    sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    sp.add_argument("--nproc", type=count, help="data-parallel processes: re-run this command "
                    "under torchrun with N processes (docs/DISTRIBUTED.md)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(run=cmd_distill)

    sp = sub.add_parser("curves", help="plot distillation learning curves (match vs minutes)")
    sp.add_argument("runs", type=path, nargs="+", help="distillation run directories")
    sp.add_argument("--out", type=path, required=True, help="PNG path")
    sp.add_argument("--tau", default=default_of(plot_curves, "tau"),
                    help="validation set, e.g. tau1 or tau0.7")
    sp.add_argument("--metric", default=default_of(plot_curves, "metric"),
                    choices=["first", "joint"])
    sp.add_argument("--title", default=default_of(plot_curves, "title"))
    sp.set_defaults(run=cmd_curves)
