"""`kforcing eval` (a model's perplexity on a split, or K-Forcing students against their teacher:
match, first-token TV, free-running samples), `kforcing eval-chat` (AR, lossless and K-Forcing
answers to chat prompts: speed, exactness, quality) and `kforcing match` (window match rates).

`eval-chat` is its own top-level command rather than `eval chat`: a subcommand would make
`eval` a group, and the old form `kforcing eval --student ... --data ...` parse differently."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

from kforcing.cli.common import (
    cache_flag,
    count,
    default_of,
    device_flag,
    ints,
    load_with_tokenizer,
    natural,
    path,
    positive,
    print_json,
    student_tokenizer,
    temperatures,
)
from kforcing.core.device import DECODE_DTYPES, decode_dtype, decode_weights
from kforcing.errors import KForcingError
from kforcing.evaluation.bench_machine import parse_cores, pin_cores
from kforcing.evaluation.chat import (
    ChatEvalConfig,
    chat_eval,
    check_chat_student,
    load_prompts,
    write_chat_eval,
)
from kforcing.evaluation.evaluate import EvalConfig, evaluate
from kforcing.evaluation.match import build_match_set, match_rates
from kforcing.evaluation.quality import load_judge
from kforcing.io.checkpoint import (
    atomic_write_json,
    load_model,
    resolve_model_dir,
    tokenizer_path,
)
from kforcing.io.hub import chat_template
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import TokenFile
from kforcing.recipes.eval_report import eval_markdown
from kforcing.students.feedback import FeedbackStudent, load_feedback
from kforcing.students.pushforward import check_k
from kforcing.students.store import load_student, student_info, teacher_dir_of, teacher_of
from kforcing.training.feedback import eval_contexts, evaluate_feedback
from kforcing.training.teacher import evaluate_loss


def cmd_eval(args) -> None:
    if args.model and args.student:
        raise KForcingError("give --model (perplexity of a model) or --student (students "
                            "against their teacher), not both")
    if args.student:
        return eval_students(args)
    if not args.model:
        raise KForcingError("eval needs --model (perplexity) or --student (student evaluation)")
    model, _ = load_with_tokenizer(args.model, args.device)
    split = Path(args.data) / f"{args.split}.bin"
    loss = evaluate_loss(model, TokenFile(split), min(args.block_size, model.config.max_seq_len),
                         args.batch_size, args.max_batches, args.device)
    print_json({"split": args.split, "loss": loss, "perplexity": math.exp(loss),
                "model": str(args.model)})


def _same_vocab(a, b) -> bool:
    return a.get_vocab(with_added_tokens=True) == b.get_vocab(with_added_tokens=True)


def eval_config(args) -> EvalConfig:
    """Student mode's config: every EvalConfig field has a flag of the same name."""
    return EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})


def eval_students(args) -> None:
    cfg = eval_config(args)
    ks = ints(args.k, "--k") if args.k is not None else None
    data = Path(args.data)
    tokens = TokenFile(data / f"{args.split}.bin")
    infos = [student_info(p) for p in args.student]
    teacher_path = (resolve_model_dir(args.teacher) if args.teacher
                    else teacher_dir_of(args.student[0]))
    teacher = load_model(teacher_path, device=args.device).eval()
    tok = load_tokenizer(student_tokenizer(args.student[0]))
    if (data / "tokenizer.json").is_file() and not _same_vocab(
            tok, load_tokenizer(data / "tokenizer.json")):
        raise KForcingError(f"the student's tokenizer differs from the one of {data}: "
                            "mismatched tokenizer")
    runs, trained_ks = [], []
    for student_dir, info in zip(args.student, infos, strict=True):
        student = load_student(student_dir, device=args.device)
        for k in ks or [info.k or student.config.max_k]:
            runs.append((str(student_dir), student, k))
            trained_ks.append(info.k)
    judge, judge_info = load_judge(args.judge, cache=args.cache, device=args.device)
    result = evaluate(teacher, tokens, runs, cfg=cfg, tokenizer=tok, judge=judge,
                      progress=not args.quiet)
    result = {"command": eval_command(args), "data": str(data), "split": args.split,
              "teacher_path": str(teacher_path), "judge": judge_info, **result}
    for entry, trained_k in zip(result["students"], trained_ks, strict=True):
        entry["trained_k"] = trained_k
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(eval_markdown(result), encoding="utf-8")
    if args.out:
        atomic_write_json(Path(args.out), result)
        print(eval_markdown(result))
    else:
        print(json.dumps(result))


def eval_command(args) -> str:
    """The command line that reproduces this evaluation (recorded in its JSON)."""
    parts = ["kforcing", "eval"]
    for s in args.student:
        parts += ["--student", s]
    if args.teacher:
        parts += ["--teacher", args.teacher]
    parts += ["--data", args.data, "--split", args.split]
    if args.k:
        parts += ["--k", args.k]
    for name in ("tau", "new_tokens", "prompts", "prompt_len", "context_len", "windows",
                 "tv_contexts", "tv_draws", "samples", "batch_size", "seed", "judge", "out"):
        v = getattr(args, name)
        if v is not None:
            parts += ["--" + name.replace("_", "-"), str(v)]
    return shlex.join(parts)


def cmd_eval_chat(args) -> None:
    cfg = ChatEvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(
        ChatEvalConfig) if getattr(args, f.name, None) is not None})
    prompts = load_prompts(args.prompts)[:args.limit]
    if args.cores:
        pin_cores(parse_cores(args.cores))
    info = student_info(args.student)
    teacher_path = (resolve_model_dir(args.teacher) if args.teacher
                    else teacher_dir_of(args.student))
    tok_cfg = chat_template(teacher_path)
    if tok_cfg is None:
        raise KForcingError(f"the teacher {teacher_path} has no chat template (a "
                            "tokenizer_config.json with chat_template): chat evaluation needs an "
                            "instruction-tuned teacher such as SmolLM2 (kforcing fetch smollm2)")
    teacher = load_model(teacher_path, device=args.device).eval()
    student = (load_feedback(args.student, device=args.device, teacher=teacher)
               if info.layout == "feedback" else load_student(args.student, device=args.device))
    check_chat_student(student)
    dtype = decode_dtype(args.dtype, args.device)
    student, teacher = decode_weights(student, dtype), decode_weights(teacher, dtype)
    tok = load_tokenizer(tokenizer_path(teacher_path))
    if tok.get_vocab_size() > teacher.config.vocab_size:
        raise KForcingError(f"the tokenizer of {teacher_path} has {tok.get_vocab_size()} tokens "
                            f"but the teacher only {teacher.config.vocab_size}: mismatched "
                            "tokenizer")
    result = chat_eval(student, tok, tok_cfg, prompts, cfg, teacher=teacher,
                       command=chat_command(args), progress=not args.quiet)
    ev = result.eval
    ev.update(student=str(args.student), teacher_path=str(teacher_path),
              prompts_file=str(args.prompts) if args.prompts else "packaged: chat_prompts.jsonl")
    ev["students"][0].update(student=str(args.student), trained_k=info.k)
    if ev["busy_warning"]:
        print(ev["busy_warning"], file=sys.stderr)
    chat = ev["chat"]
    if chat["lossless_mismatches"]:
        print(f"WARNING: {chat['lossless_mismatches']} lossless answers differ from the seeded "
              f"AR answers: {', '.join(chat['mismatched_ids'])}", file=sys.stderr)
    if args.out:
        paths = write_chat_eval(result, args.out)
        print(f"wrote {paths['eval']} and {paths['bench']}", file=sys.stderr)
    print_json({"prompts": len(prompts), "k": cfg.k, "head": ev["head"],
                "lossless_mismatches": chat["lossless_mismatches"],
                "tokens_per_pass": chat["lossless"]["tokens_per_pass"],
                **{f"{m}_tokens_per_s": round(chat[m]["tokens_per_s"], 2)
                   for m in ("ar", "lossless", "kforcing")},
                "gen_ppl_ar": ev["teacher"]["gen_ppl_teacher"],
                "gen_ppl_kforcing": ev["students"][0]["gen_ppl_teacher"], "busy": ev["busy"]})


def chat_command(args) -> str:
    """The command line that reproduces this chat evaluation (recorded in its outputs)."""
    parts = ["kforcing", "eval-chat", "--student", args.student]
    for name in ("teacher", "prompts", "limit", "k", "tree", "new_tokens", "tau", "seed",
                 "repeats", "samples", "out", "cores", "device", "dtype"):
        v = getattr(args, name)
        if v is not None:
            parts += ["--" + name.replace("_", "-"), str(v)]
    return shlex.join(parts)


def cmd_match(args) -> None:
    student = load_student(args.student, device=args.device)
    k = args.k or student.config.max_k
    check_k(k, student.config.max_k)
    split = TokenFile(Path(args.data) / f"{args.split}.bin")
    taus = temperatures(args.taus, "--taus")
    # the reference is the teacher itself: in the shared layout the student's context model is
    # its own fine-tuned backbone, not the teacher
    if isinstance(student, FeedbackStudent):
        # the token-feedback student: its window against the teacher's own chain under the
        # student's coupling (y_1 sampled), on held-out contexts of --block-size tokens
        contexts = eval_contexts(split, args.windows, args.block_size, seed=args.seed)
        print_json({"student": args.student, "k": k, "split": args.split, "head": "feedback",
                    "coupling": student.config.coupling,
                    **evaluate_feedback(student, contexts, k=k, taus=taus, seed=args.seed)})
        return
    teacher = teacher_of(student, args.student)
    mset = build_match_set(teacher, split, k=k, block_size=args.block_size,
                           n_windows=args.windows, taus=taus, order=student.config.cdf_order,
                           seed=args.seed, device=args.device)
    print_json({"student": args.student, "k": k, "split": args.split,
                **match_rates(student, mset)})


def add_parser(sub) -> None:
    D = EvalConfig()
    sp = sub.add_parser("eval", help="perplexity of a model on a split, or K-Forcing students "
                                     "against their teacher (match, TV, samples) as JSON")
    sp.add_argument("--model", type=path, help="perplexity mode: model or run directory")
    sp.add_argument("--student", type=path, action="append",
                    help="student mode: a student directory (repeatable)")
    sp.add_argument("--teacher", type=path,
                    help="the students' teacher (default: the first one's own)")
    sp.add_argument("--data", type=path, required=True, help="prepared corpus directory")
    sp.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    sp.add_argument("--out", type=path, help="student mode: JSON file (default: print the JSON)")
    sp.add_argument("--markdown", type=path,
                    help="student mode: also write the tables to this file")
    sp.add_argument("--k", help="windows, e.g. 2,4 (default: the k each student was trained at)")
    sp.add_argument("--tau", type=positive, default=D.tau)
    sp.add_argument("--new-tokens", type=count, default=D.new_tokens)
    sp.add_argument("--prompts", type=count, default=D.prompts, help="held-out prompts")
    sp.add_argument("--prompt-len", type=count, default=D.prompt_len)
    sp.add_argument("--context-len", type=count, default=D.context_len,
                    help="held-out context length for match and TV")
    sp.add_argument("--windows", type=count, default=D.windows, help="match windows")
    sp.add_argument("--tv-contexts", type=count, default=D.tv_contexts)
    sp.add_argument("--tv-draws", type=count, default=D.tv_draws,
                    help="uniforms per TV context")
    sp.add_argument("--samples", type=natural, default=D.samples, help="decoded samples kept")
    sp.add_argument("--judge", default="smollm2",
                    help="independent judge LM: smollm2, a .gguf file, or none")
    cache_flag(sp)
    sp.add_argument("--seed", type=natural, default=D.seed)
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.add_argument("--block-size", type=count, default=256, help="perplexity mode")
    sp.add_argument("--batch-size", type=count, default=D.batch_size)
    sp.add_argument("--max-batches", type=count, default=None, help="perplexity mode")
    device_flag(sp)
    sp.set_defaults(run=cmd_eval)

    C = ChatEvalConfig()
    sp = sub.add_parser("eval-chat", help="chat prompts at batch 1: AR, lossless and K-Forcing "
                        "answers (speed, tokens per teacher pass, exactness, gen-PPL)")
    sp.add_argument("--student", type=path, required=True,
                    help="a token-feedback or PushForward student directory")
    sp.add_argument("--teacher", type=path, help="its teacher (default: the one it records); "
                    "must have a chat template")
    sp.add_argument("--prompts", type=path, help="a .jsonl (\"prompt\" per line) or .txt (one "
                    "per line) file (default: the packaged 40-prompt chat set)")
    sp.add_argument("--limit", type=count, help="evaluate the first N prompts only")
    sp.add_argument("--k", type=count, default=C.k, help="tokens per pass")
    sp.add_argument("--tree", help="lossless with a token-feedback student: verify a draft tree "
                    "of these k-1 widths per teacher pass, e.g. 4,2,1 (default: one chain)")
    sp.add_argument("--new-tokens", type=count, default=C.new_tokens,
                    help="most tokens per answer (EOS stops earlier)")
    sp.add_argument("--tau", type=positive, default=C.tau)
    sp.add_argument("--seed", type=natural, default=C.seed, help="prompt i uses seed "
                    "seed * 2^32 + i")
    sp.add_argument("--repeats", type=count, default=C.repeats,
                    help="timed sweeps over the prompts (median tokens/s)")
    sp.add_argument("--samples", type=natural, default=C.samples,
                    help="prompts in the side-by-side table")
    sp.add_argument("--out", type=path, help="directory for eval.json and bench.jsonl")
    sp.add_argument("--cores", help="pin the process to these cores (e.g. 0 or 0-3) before "
                    "anything runs; the result records the load average either way")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--dtype", choices=DECODE_DTYPES, default="fp32",
                    help="weights and activations of the teacher and the draft, in all three "
                    "methods; auto: bf16 where the hardware has native bf16 matmuls (AVX512-BF16, "
                    "AMX, a bf16 GPU), else fp32 (default: %(default)s)")
    device_flag(sp)
    sp.set_defaults(run=cmd_eval_chat)

    sp = sub.add_parser("match", help="student vs teacher: window match rates, same uniforms")
    sp.add_argument("--student", type=path, required=True)
    sp.add_argument("--data", type=path, required=True, help="prepared corpus directory")
    sp.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                    help="windows from this split (train: against validation, whether the "
                    "student under- or overfits its training text)")
    sp.add_argument("--k", type=count, default=None,
                    help="window (default: the student's max_k)")
    sp.add_argument("--windows", type=count, default=1024)
    sp.add_argument("--taus", default="1.0,0.7")
    sp.add_argument("--block-size", type=count, default=64, help="context length of a window")
    sp.add_argument("--seed", type=natural, default=default_of(build_match_set, "seed"))
    device_flag(sp)
    sp.set_defaults(run=cmd_match)
