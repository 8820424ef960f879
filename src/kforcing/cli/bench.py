"""`kforcing bench`: decode speed by batch size (kforcing.evaluation.bench)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from kforcing.cli.common import (
    count,
    default_of,
    device_flag,
    ints,
    natural,
    non_negative,
    parse_tokens_at,
    path,
    positive,
)
from kforcing.core.device import LAYOUTS
from kforcing.decoding.machine import load_avg_1m
from kforcing.errors import KForcingError
from kforcing.evaluation.bench import (
    METHODS,
    OPTIONAL,
    BenchConfig,
    merge_results,
    run_bench,
    write_results,
)
from kforcing.evaluation.bench_inputs import load_models
from kforcing.evaluation.bench_machine import busy_warning, parse_cores, pin_cores
from kforcing.evaluation.bench_report import dtype_winners
from kforcing.evaluation.roofline import DTYPES


def dtypes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(DTYPES)} (comma-separated), "
                                         f"got '{text}'")
    return list(dict.fromkeys(names))


def bench_config(args) -> BenchConfig:
    methods = METHODS
    if args.methods is not None:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if not methods:
            raise KForcingError(f"--methods is empty: choose from {', '.join(METHODS)}")
    ks = None
    if args.k is not None:   # "1,2,4": the K-Forcing rows; "auto": the kforcing-auto row
        parts = [p.strip() for p in args.k.split(",") if p.strip()]
        fixed = [p for p in parts if p != "auto"]
        ks = ints(",".join(fixed), "--k") if fixed or not parts else None
        if "auto" in parts and "kforcing-auto" not in methods:
            methods += ("kforcing-auto",)
    if args.compile:
        methods += tuple(m for m in OPTIONAL if m not in methods)
    if args.no_hf:
        methods = tuple(m for m in methods if not m.startswith("hf-"))
    return BenchConfig(batch_sizes=ints(args.batch_sizes, "--batch-sizes"),
                       prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       new_tokens_at=parse_tokens_at(args.new_tokens_at, "--new-tokens-at")
                       or None, repeats=args.repeats, max_seconds=args.max_seconds, ks=ks,
                       methods=methods, temperature=args.temperature, seed=args.seed,
                       cache=args.cache, roofline=not args.no_roofline,
                       interleave=args.interleave, layout=args.layout)


def cmd_bench(args) -> None:
    """Writes <out>/bench.jsonl, bench_meta.json and two PNGs; one JSON line per row."""
    cfg = bench_config(args)
    if args.cores:
        pinned = pin_cores(parse_cores(args.cores))
        print(f"pinned to core(s) {','.join(map(str, pinned))}; load average {load_avg_1m()}",
              file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for dtype in args.dtype:   # fresh models per dtype: a bf16 cast does not round-trip
        teacher, student, draft = load_models(args.model, args.student, args.draft)
        teacher = teacher.to(args.device)
        student = None if student is None else student.to(args.device)
        draft = None if draft is None else draft.to(args.device)
        results.append(run_bench(teacher, student, draft=draft,
                                 cfg=dataclasses.replace(cfg, dtype=dtype), data=args.data,
                                 progress=not args.quiet))
    result = results[0] if len(results) == 1 else merge_results(
        results, student if student is not None else teacher)
    result.config.update(model=args.model, student_dir=args.student, draft=args.draft)
    paths = write_results(result, args.out)
    for s in result.skipped:
        b = f" at batch {s['batch_size']}" if s["batch_size"] else ""
        print(f"skipped {s['method']}{b}: {s['reason']}", file=sys.stderr)
    for r in result.rows:
        print(json.dumps({"method": r.method, "k": r.k, "sampling": r.sampling,
                          "batch_size": r.batch_size, "tokens_per_s": round(r.tokens_per_s, 1),
                          "step_latency_ms": None if r.step_latency_ms is None
                          else round(r.step_latency_ms, 2), "repeats": r.repeats,
                          "load_avg_1m": r.machine.get("load_avg_1m"),
                          "busy": r.machine.get("busy"),
                          "decode_tokens_per_s": r.extra.get("decode_tokens_per_s"),
                          "fraction_of_bound": r.extra.get("fraction_of_bound")}))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    if len(results) > 1:
        print(json.dumps({"dtype_winners": dtype_winners([dataclasses.asdict(r)
                                                          for r in result.rows])}))
    warning = busy_warning(result.rows)
    if warning:
        print("\n" + "!" * 78 + f"\n{warning}\n" + "!" * 78, file=sys.stderr)


def add_parser(sub) -> None:
    sp = sub.add_parser("bench", help="decode speed by batch size: AR, K-Forcing (k, auto), "
                        "lossless, HF generate and assisted generation")
    sp.add_argument("--model", type=path,
                    help="the AR teacher (default: the student's teacher, else a "
                    "random `small` model)")
    sp.add_argument("--student", type=path, help="K-Forcing student directory")
    sp.add_argument("--draft", type=path,
                    help="small model trained on the same corpus, for HF assisted "
                    "generation")
    sp.add_argument("--data", type=path, help="prepared corpus: prompts from its validation split "
                    "(default: random tokens)")
    sp.add_argument("--k", help="comma-separated k values of the kforcing rows (default: 1,2,4,8 "
                    "up to max_k); 'auto' adds the kforcing-auto row")
    sp.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: "
                    f"all of them), or {','.join(OPTIONAL)}")
    sp.add_argument("--compile", action="store_true",
                    help="add the ar-compiled and kforcing-compiled rows: AR steps and "
                    "K-Forcing windows through torch.compile graphs (decoding.generate."
                    "compile_decoders; rows record their first run, which compiles)")
    sp.add_argument("--batch-sizes",
                    default=",".join(map(str, default_of(BenchConfig, "batch_sizes"))))
    sp.add_argument("--prompt-len", type=count, default=default_of(BenchConfig, "prompt_len"))
    sp.add_argument("--new-tokens", type=count, default=default_of(BenchConfig, "new_tokens"))
    sp.add_argument("--new-tokens-at", help="per batch size overrides, e.g. 64=64,256=32 "
                    "(large batches; each row records its own new_tokens)")
    sp.add_argument("--repeats", type=count, default=default_of(BenchConfig, "repeats"))
    sp.add_argument("--max-seconds", type=non_negative,
                    default=default_of(BenchConfig, "max_seconds"),
                    help="per configuration: stop repeating once this many seconds are spent")
    sp.add_argument("--interleave", action="store_true",
                    help="at each batch size the methods take turns, one timed run each per "
                    "round, --repeats rounds: a drift of the machine's speed hits them alike")
    sp.add_argument("--temperature", type=positive,
                    default=default_of(BenchConfig, "temperature"))
    sp.add_argument("--seed", type=natural, default=default_of(BenchConfig, "seed"))
    sp.add_argument("--threads", type=count, help="torch threads (default: torch's choice)")
    sp.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peers")
    sp.add_argument("--dtype", type=dtypes, default=[default_of(BenchConfig, "dtype")],
                    help=f"weights and activations of every decoder: one of {','.join(DTYPES)} "
                    "or a list (fp32,bf16 measures each and reports which wins per batch size)")
    sp.add_argument("--layout", choices=LAYOUTS, default=default_of(BenchConfig, "layout"),
                    help="the weights' memory order while decoding (auto: in-major for fp32 "
                    "weights larger than the CPU's last-level cache, which stream faster so; "
                    "rows record it as machine.weight_layout)")
    sp.add_argument("--cores", help="pin the process to these cores (e.g. 0 or 0-3) before "
                    "anything runs; rows record the load average either way")
    sp.add_argument("--no-roofline", action="store_true",
                    help="skip the machine calibration and the per-row roofline bound")
    sp.add_argument("--cache", type=path, help="cache directory for the --k auto calibration")
    sp.add_argument("--out", type=path, default="docs/results",
                    help="where bench.jsonl and plots go")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    device_flag(sp)
    sp.set_defaults(run=cmd_bench)
