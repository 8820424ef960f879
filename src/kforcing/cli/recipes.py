"""The recipes: `kforcing demo` (the whole chain in minutes) and `kforcing reproduce` (the whole
chain from nothing to docs/RESULTS.md, resumable)."""

from __future__ import annotations

from kforcing.cli.common import (
    cache_flag,
    count,
    default_of,
    ints,
    non_negative,
    parse_tokens_at,
    path,
    positive,
)
from kforcing.core.device import DECODE_DTYPES
from kforcing.evaluation.bench import command_line
from kforcing.recipes.demo import run_demo
from kforcing.recipes.reproduce import ReproduceConfig, run_reproduce


def cmd_demo(args) -> None:
    run_demo(minutes=args.minutes, conversations=args.conversations, teacher=args.teacher,
             student=args.student, out=args.out, cache=args.cache, new_tokens=args.new_tokens,
             k=args.k, dtype=args.dtype)


# flags of `kforcing reproduce` that set a ReproduceConfig field of the same name, with a type
REPRODUCE_FLAGS = {
    "out": path, "results": path, "results_dir": path, "source": str, "vocab_size": count,
    "data": path, "teacher": path, "draft": path, "scale": positive, "teacher_min": positive,
    "stage_min": positive, "draft_min": positive, "teacher_preset": str, "draft_preset": str,
    "teacher_block_size": count, "teacher_batch_size": count, "distill_block_size": count,
    "distill_batch_size": count, "eval_contexts": count, "match_windows": count,
    "sample_tokens": count, "judge": str, "bench_new_tokens": count, "bench_repeats": count,
    "bench_max_seconds": non_negative,
}


def reproduce_config(args) -> ReproduceConfig:
    return ReproduceConfig(
        **{name: getattr(args, name) for name in REPRODUCE_FLAGS}, cache=args.cache,
        students=args.students.split(",") if args.students else None,
        eval={k: v for k, v in {"new_tokens": args.eval_new_tokens,
                                "prompts": args.eval_prompts}.items() if v is not None},
        bench_batch_sizes=ints(args.bench_batch_sizes, "--bench-batch-sizes"),
        bench_new_tokens_at=parse_tokens_at(args.bench_new_tokens_at, "--bench-new-tokens-at"),
        progress=not args.quiet)


def cmd_reproduce(args) -> None:
    run_reproduce(reproduce_config(args), command=command_line())


def add_parser(sub) -> None:
    sp = sub.add_parser("demo", help="SmolLM2-135M-Instruct made faster: a token-feedback "
                        "draft trained in minutes, then AR, lossless and K-Forcing answers")
    sp.add_argument("--minutes", type=positive, default=default_of(run_demo, "minutes"),
                    help="CPU-minutes of draft training (default: %(default)s)")
    sp.add_argument("--conversations", type=count,
                    default=default_of(run_demo, "conversations"),
                    help="chats the teacher writes to train the draft on (default: %(default)s)")
    sp.add_argument("--teacher", type=path,
                    help="an imported instruct teacher to use instead of SmolLM2")
    sp.add_argument("--student", type=path,
                    help="use this feedback student instead of training the demo's draft")
    sp.add_argument("--out", type=path, default=default_of(run_demo, "out"))
    sp.add_argument("--new-tokens", type=count, default=default_of(run_demo, "new_tokens"))
    sp.add_argument("--k", type=count, default=default_of(run_demo, "k"))
    sp.add_argument("--dtype", choices=DECODE_DTYPES, default=default_of(run_demo, "dtype"),
                    help="of the comparison; auto: bf16 where the hardware has native bf16 "
                    "matmuls, else fp32 (default: %(default)s)")
    cache_flag(sp)
    sp.set_defaults(run=cmd_demo)

    sp = sub.add_parser("reproduce", help="the whole chain on Brown from nothing, resumable: "
                        "teacher, distillation, draft, eval, bench -> docs/RESULTS.md")
    helps = {"out": "run directory (state.json, models)", "results": "the Markdown report",
             "results_dir": "bench.jsonl and PNGs", "data": "use this prepared corpus",
             "teacher": "use this trained teacher", "draft": "use this draft model",
             "scale": "multiplies every training budget (0.01: a smoke run of minutes)",
             "stage_min": "minutes per distillation stage",
             "judge": "judge LM of the eval step (or none)"}
    for name, typ in REPRODUCE_FLAGS.items():
        default = default_of(ReproduceConfig, name)
        sp.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=default,
                        help=f"{helps.get(name, '')} (default: {default})".lstrip())
    cache_flag(sp)
    sp.add_argument("--students", help="use these stages: K1_DIR,K2_DIR,K4_DIR")
    sp.add_argument("--eval-new-tokens", type=count, help="eval: tokens per free-running sample")
    sp.add_argument("--eval-prompts", type=count, help="eval: held-out prompts")
    sp.add_argument("--bench-batch-sizes",
                    default=",".join(map(str, default_of(ReproduceConfig, "bench_batch_sizes"))))
    sp.add_argument("--bench-new-tokens-at", default=",".join(
        f"{b}={n}" for b, n in default_of(ReproduceConfig, "bench_new_tokens_at").items()),
        help="per batch size new-token counts, e.g. 64=128,256=64 ('' for none)")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(run=cmd_reproduce)

