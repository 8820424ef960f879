"""`kforcing distill` (one distillation stage: AR -> k=1 -> 2 -> 4) and `kforcing curves` (its
learning curves).

Two designs share the command: `--design pushforward` (the default: the paper's K-Forcing
students, kforcing.training.distill) and `--design feedback` (the token-feedback student,
docs/METHOD.md section 9: a teacher cache, then kforcing.training.feedback). A flag that belongs
to the other design is refused by name."""

from __future__ import annotations

import json
import sys
from dataclasses import fields

from kforcing.cli.common import (
    config_values,
    count,
    default_of,
    device_flag,
    load_config,
    natural,
    non_negative,
    path,
    positive,
    print_json,
)
from kforcing.core.config import from_dict
from kforcing.core.sampling import CDF_ORDERS, COUPLINGS
from kforcing.errors import KForcingError
from kforcing.evaluation.curves import plot_curves, summarize
from kforcing.recipes.feedback import CacheOptions, default_cache_dir, run_feedback_stage
from kforcing.students.feedback import FeedbackConfig
from kforcing.students.pushforward import HEADS, LAYOUTS, StudentConfig
from kforcing.students.store import student_info
from kforcing.training import distributed
from kforcing.training.distill import TARGETS, DistillConfig, distill, stage_student_config
from kforcing.training.distributed import launch, without_nproc
from kforcing.training.feedback import FeedbackTrainConfig

DESIGNS = ("pushforward", "feedback")
STUDENT_FLAGS = ("max_k", "layout", "head", "cdf_order")
FEEDBACK_STUDENT_FLAGS = ("max_k", "draft_layers", "draft_vocab_size", "coupling", "tau_min",
                          "tau_max")
# dest -> (flag, design) of every flag only one design reads; filled by add_parser
DESIGN_FLAGS: dict[str, tuple[str, str]] = {}


def _check_design(args) -> None:
    """Refuse, by name, a flag the user set that the chosen design does not read."""
    for dest, (flag, design) in DESIGN_FLAGS.items():
        if design != args.design and getattr(args, dest, None) is not None:
            raise KForcingError(f"{flag} belongs to the {design} design, not --design "
                                f"{args.design}: drop it or pass --design {design}")


def distill_config(args) -> DistillConfig:
    """The stage's config: the --config file, then every flag the user set; a stage started
    with --init inherits the init student's layout, head and CDF order."""
    base = load_config(args.config) if args.config else {}
    flags = config_values(DistillConfig, args)
    student = {**base.pop("student", {}),
               **{k: getattr(args, k) for k in STUDENT_FLAGS if getattr(args, k) is not None}}
    init = flags.get("init", base.get("init"))
    if init and student_info(init).layout == "feedback":
        raise KForcingError(f"--init {init} is a token-feedback student: add --design feedback")
    return from_dict(DistillConfig, {**base, **flags,
                                     "student": stage_student_config(init, student)})


def feedback_config(args) -> FeedbackTrainConfig:
    """The feedback stage's config: the --config file (FeedbackTrainConfig fields), then every
    flag the user set; stage k=1 (or --cache-only) without --cache gets <out>/../teacher-cache."""
    base = load_config(args.config) if args.config else {}
    flags = config_values(FeedbackTrainConfig, args)
    if args.teacher_cache is not None:
        flags["cache"] = args.teacher_cache
    student = {**base.pop("student", {}),
               **{k: getattr(args, k) for k in FEEDBACK_STUDENT_FLAGS
                  if getattr(args, k) is not None}}
    merged = {**base, **flags, "student": student}
    k1 = merged.get("k", default_of(FeedbackTrainConfig, "k")) == 1
    if (k1 or args.cache_only) and not merged.get("cache"):
        out = merged.get("out_dir", default_of(FeedbackTrainConfig, "out_dir"))
        merged["cache"] = str(default_cache_dir(out))
    return from_dict(FeedbackTrainConfig, merged)


def cache_options(args) -> CacheOptions:
    return CacheOptions(**{f.name: getattr(args, "cache_" + f.name)
                           for f in fields(CacheOptions)
                           if getattr(args, "cache_" + f.name) is not None})


def cmd_distill(args) -> None:
    _check_design(args)
    feedback = args.design == "feedback"
    if args.nproc:
        raise SystemExit(launch(args.nproc, without_nproc(sys.argv[1:])))
    with distributed.guard():
        if feedback:
            result = run_feedback_stage(feedback_config(args), cache_options(args),
                                        resume=args.resume, progress=not args.quiet,
                                        cache_only=bool(args.cache_only))
        else:
            result = distill(distill_config(args), resume=args.resume, progress=not args.quiet)
    if distributed.env_context().main:
        print(json.dumps(result, default=str))


def cmd_curves(args) -> None:
    plot_curves(args.runs, args.out, tau=args.tau, metric=args.metric, title=args.title)
    print_json(summarize(args.runs))


def _shared_flags(sp, flags: dict) -> None:
    """Flags both designs read; --help states each design's default where they differ."""
    for name, typ in flags.items():
        a = default_of(DistillConfig, name) if name != "max_k" else \
            default_of(StudentConfig, name)
        b = (default_of(FeedbackConfig, name) if name in FEEDBACK_STUDENT_FLAGS
             else default_of(FeedbackTrainConfig, name))
        text = f"default: {a}" if a == b else f"default: {a} (pushforward), {b} (feedback)"
        sp.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                        help=text)


def _only(group, design: str, flag: str, dest: str, **kw) -> None:
    """A flag only `design` reads (default None: set means set by the user)."""
    DESIGN_FLAGS[dest] = (flag, design)
    group.add_argument(flag, dest=dest, default=None, **kw)


def _only_config(group, design: str, cls: type, flags: dict) -> None:
    for name, typ in flags.items():
        _only(group, design, "--" + name.replace("_", "-"), name, type=typ,
              help=f"default: {default_of(cls, name)}")


def _pushforward_flags(sp) -> None:
    g = sp.add_argument_group("pushforward design (the default)")
    P = "pushforward"
    _only(g, P, "--layout", "layout", choices=LAYOUTS,
          help=f"default: {default_of(StudentConfig, 'layout')}")
    _only(g, P, "--head", "head", choices=HEADS,
          help=f"default: {default_of(StudentConfig, 'head')}")
    _only(g, P, "--cdf-order", "cdf_order", choices=CDF_ORDERS,
          help=f"default: {default_of(StudentConfig, 'cdf_order')}")
    _only(g, P, "--target", "target", choices=TARGETS,
          help=f"default: {default_of(DistillConfig, 'target')}")
    _only_config(g, P, DistillConfig, {
        "tau_start": positive, "tau_ramp": positive, "block_size": count, "windows": count,
        "noise_lr": positive, "eval_contexts": count})
    # imported teachers on small hardware (docs/TEACHERS.md)
    _only(g, P, "--data-free", "data_free", action="store_true",
          help="no corpus: distill on the teacher's own samples (cached)")
    _only_config(g, P, DistillConfig, {"data_free_tokens": count, "train_last_blocks": natural})
    _only(g, P, "--grad-checkpoint", "grad_checkpoint", action="store_true",
          help="recompute activations in backward (less memory)")


def _feedback_flags(sp) -> None:
    g = sp.add_argument_group("feedback design (--design feedback; docs/METHOD.md section 9)")
    F = "feedback"
    _only_config(g, F, FeedbackConfig, {"draft_layers": count})
    _only(g, F, "--draft-vocab", "draft_vocab_size", type=count,
          help="draft vocabulary: the N most frequent train tokens (default: the teacher's)")
    _only(g, F, "--coupling", "coupling", choices=COUPLINGS,
          help=f"default: {default_of(FeedbackConfig, 'coupling')}")
    _only_config(g, F, FeedbackTrainConfig, {
        "context": count, "anchors": count, "min_lr": non_negative, "reg_weight": non_negative,
        "eval_windows": count, "eval_context": count, "eval_k": count, "threads": count})
    _only(g, F, "--bf16", "bf16", action="store_true",
          help="bf16 autocast for the teacher's passes of self-forcing stages")
    _only(g, F, "--draft-bf16", "draft_bf16", action="store_true",
          help="bf16 autocast for the draft's forward (weights stay fp32)")
    _only(g, F, "--cache", "teacher_cache", type=path,
          help="teacher cache of stage k=1, built when missing or incomplete (resumable) "
          "(default: <out>/../teacher-cache, shared by the chain's stages)")
    _only(g, F, "--cache-windows", "cache_windows", type=count,
          help=f"corpus windows in the cache, at most (default: {CacheOptions.windows}; a "
          "smaller corpus gives all its windows)")
    _only(g, F, "--cache-block-size", "cache_block_size", type=count,
          help=f"tokens per cached window (default: {CacheOptions.block_size})")
    _only(g, F, "--cache-top-n", "cache_top_n", type=count,
          help=f"teacher log-probabilities kept per position (default: {CacheOptions.top_n})")
    _only(g, F, "--cache-bf16", "cache_bf16", action="store_true",
          help="build the cache under bf16 autocast")
    _only(g, F, "--cache-only", "cache_only", action="store_true",
          help="build the teacher cache and stop")


def add_parser(sub) -> None:
    sp = sub.add_parser("distill", help="one distillation stage (AR -> k=1 -> 2 -> 4) of a "
                        "K-Forcing or token-feedback student")
    sp.add_argument("--design", choices=DESIGNS, default="pushforward",
                    help="pushforward: the paper's K-Forcing students; feedback: the "
                    "token-feedback student (default: pushforward)")
    sp.add_argument("--teacher", type=path, help="teacher model or run directory")
    sp.add_argument("--data", type=path, help="prepared corpus directory")
    sp.add_argument("--out", dest="out_dir", type=path, help="stage output directory (default: "
                    f"{default_of(DistillConfig, 'out_dir')} (pushforward), "
                    f"{default_of(FeedbackTrainConfig, 'out_dir')} (feedback))")
    sp.add_argument("--init", type=path, help="previous stage's student (self-forcing stages)")
    sp.add_argument("--config", type=path, help="JSON file with DistillConfig fields "
                    "(FeedbackTrainConfig fields with --design feedback)")
    _shared_flags(sp, {"k": count, "max_k": count, "tau_min": positive, "tau_max": positive,
                       "batch_size": count, "lr": positive, "max_steps": count,
                       "time_budget_min": positive, "eval_every_min": positive,
                       "ckpt_every": count, "seed": natural})
    device_flag(sp, default=None)
    sp.add_argument("--nproc", type=count, help="data-parallel processes: re-run this command "
                    "under torchrun with N processes (docs/DISTRIBUTED.md)")
    sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    _pushforward_flags(sp)
    _feedback_flags(sp)
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
