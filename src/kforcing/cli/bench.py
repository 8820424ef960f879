"""`kforcing bench` and `kforcing reproduce` (registered by kforcing.cli.main)."""

from __future__ import annotations


def cmd_bench(args) -> None:
    from kforcing.evaluation.bench import main as bench_main
    bench_main(args)


def cmd_reproduce(args) -> None:
    from kforcing.evaluation.bench import _ints, command_line, parse_tokens_at
    from kforcing.recipes.reproduce import ReproduceConfig, run_reproduce
    cfg = ReproduceConfig(
        out=args.out, results=args.results, results_dir=args.results_dir, source=args.source,
        vocab_size=args.vocab_size, cache=args.cache, data=args.data, teacher=args.teacher,
        students=args.students.split(",") if args.students else None, draft=args.draft,
        scale=args.scale, teacher_min=args.teacher_min, stage_min=args.stage_min,
        draft_min=args.draft_min, teacher_preset=args.teacher_preset,
        draft_preset=args.draft_preset, teacher_block_size=args.teacher_block_size,
        teacher_batch_size=args.teacher_batch_size, distill_block_size=args.distill_block_size,
        distill_batch_size=args.distill_batch_size, eval_contexts=args.eval_contexts,
        match_windows=args.match_windows, sample_tokens=args.sample_tokens, judge=args.judge,
        eval={k: v for k, v in {"new_tokens": args.eval_new_tokens,
                                "prompts": args.eval_prompts}.items() if v is not None},
        bench_batch_sizes=_ints(args.bench_batch_sizes, "--bench-batch-sizes"),
        bench_new_tokens=args.bench_new_tokens, bench_repeats=args.bench_repeats,
        bench_max_seconds=args.bench_max_seconds, progress=not args.quiet,
        bench_new_tokens_at=parse_tokens_at(args.bench_new_tokens_at, "--bench-new-tokens-at"))
    run_reproduce(cfg, command=command_line())


def register(sub, commands) -> None:
    from kforcing.evaluation.bench import METHODS, BenchConfig
    from kforcing.recipes.reproduce import ReproduceConfig
    b, r = BenchConfig(), ReproduceConfig()

    sp = sub.add_parser("bench", help="decode speed by batch size: AR, K-Forcing (k, auto), "
                        "lossless, HF generate and assisted generation")
    sp.add_argument("--model", help="the AR teacher (default: the student's teacher, else a "
                    "random `small` model)")
    sp.add_argument("--student", help="K-Forcing student directory")
    sp.add_argument("--draft", help="small model trained on the same corpus, for HF assisted "
                    "generation")
    sp.add_argument("--data", help="prepared corpus: prompts from its validation split "
                    "(default: random tokens)")
    sp.add_argument("--k", help="comma-separated k values of the kforcing rows (default: 1,2,4,8 "
                    "up to max_k); 'auto' adds the kforcing-auto row")
    sp.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    sp.add_argument("--batch-sizes", default=",".join(map(str, b.batch_sizes)))
    sp.add_argument("--prompt-len", type=int, default=b.prompt_len)
    sp.add_argument("--new-tokens", type=int, default=b.new_tokens)
    sp.add_argument("--new-tokens-at", help="per batch size overrides, e.g. 64=64,256=32 "
                    "(large batches; each row records its own new_tokens)")
    sp.add_argument("--repeats", type=int, default=b.repeats)
    sp.add_argument("--max-seconds", type=float, default=b.max_seconds,
                    help="per configuration: stop repeating once this many seconds are spent")
    sp.add_argument("--temperature", type=float, default=b.temperature)
    sp.add_argument("--seed", type=int, default=b.seed)
    sp.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    sp.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peers")
    sp.add_argument("--cache", help="cache directory for the --k auto calibration")
    sp.add_argument("--out", default="docs/results", help="where bench.jsonl and plots go")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    commands["bench"] = cmd_bench

    sp = sub.add_parser("reproduce", help="the whole chain on Brown from nothing, resumable: "
                        "teacher, distillation, draft, eval, bench -> docs/RESULTS.md")
    sp.add_argument("--out", default=r.out, help="run directory (state.json, models)")
    sp.add_argument("--results", default=r.results, help="the Markdown report to write")
    sp.add_argument("--results-dir", default=r.results_dir, help="bench.jsonl and PNGs")
    sp.add_argument("--source", default=r.source, help="corpus (see `kforcing data prepare`)")
    sp.add_argument("--vocab-size", type=int, default=r.vocab_size)
    sp.add_argument("--cache", help="cache directory (default: $KFORCING_CACHE or ./.cache)")
    sp.add_argument("--data", help="use this prepared corpus")
    sp.add_argument("--teacher", help="use this trained teacher")
    sp.add_argument("--students", help="use these stages: K1_DIR,K2_DIR,K4_DIR")
    sp.add_argument("--draft", help="use this draft model")
    sp.add_argument("--scale", type=float, default=r.scale,
                    help="multiplies every training budget (0.01: a smoke run of minutes)")
    sp.add_argument("--teacher-min", type=float, default=r.teacher_min)
    sp.add_argument("--stage-min", type=float, default=r.stage_min,
                    help="minutes per distillation stage")
    sp.add_argument("--draft-min", type=float, default=r.draft_min)
    sp.add_argument("--teacher-preset", default=r.teacher_preset)
    sp.add_argument("--draft-preset", default=r.draft_preset)
    sp.add_argument("--teacher-block-size", type=int, default=r.teacher_block_size)
    sp.add_argument("--teacher-batch-size", type=int, default=r.teacher_batch_size)
    sp.add_argument("--distill-block-size", type=int, default=r.distill_block_size)
    sp.add_argument("--distill-batch-size", type=int, default=r.distill_batch_size)
    sp.add_argument("--eval-contexts", type=int, default=r.eval_contexts)
    sp.add_argument("--match-windows", type=int, default=r.match_windows)
    sp.add_argument("--sample-tokens", type=int, default=r.sample_tokens)
    sp.add_argument("--judge", default=r.judge, help="judge LM of the eval step (or none)")
    sp.add_argument("--eval-new-tokens", type=int, help="eval: tokens per free-running sample")
    sp.add_argument("--eval-prompts", type=int, help="eval: held-out prompts")
    sp.add_argument("--bench-batch-sizes", default=",".join(map(str, r.bench_batch_sizes)))
    sp.add_argument("--bench-new-tokens", type=int, default=r.bench_new_tokens)
    sp.add_argument("--bench-repeats", type=int, default=r.bench_repeats)
    sp.add_argument("--bench-max-seconds", type=float, default=r.bench_max_seconds)
    sp.add_argument("--bench-new-tokens-at", default=",".join(
        f"{b}={n}" for b, n in r.bench_new_tokens_at.items()),
        help="per batch size new-token counts, e.g. 64=128,256=64 ('' for none)")
    sp.add_argument("--quiet", action="store_true")
    commands["reproduce"] = cmd_reproduce
