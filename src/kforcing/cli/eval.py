"""`kforcing eval` (registered by kforcing.cli.main): a model's perplexity on a split, or K-Forcing
students against their teacher (match, first-token TV, free-running samples) as JSON."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from kforcing.cli.main import _load
from kforcing.errors import KForcingError
from kforcing.evaluation.evaluate import EvalConfig

D = EvalConfig()


def cmd_eval(args) -> None:
    if args.model and args.student:
        raise KForcingError("give --model (perplexity of a model) or --student (students "
                            "against their teacher), not both")
    if args.student:
        return cmd_eval_students(args)
    if not args.model:
        raise KForcingError("eval needs --model (perplexity) or --student (student evaluation)")
    import math

    from kforcing.io.data import TokenFile
    from kforcing.training.teacher import evaluate_loss
    model, _ = _load(args)
    split = Path(args.data) / f"{args.split}.bin"
    loss = evaluate_loss(model, TokenFile(split), min(args.block_size, model.config.max_seq_len),
                         args.batch_size, args.max_batches, args.device)
    print(json.dumps({"split": args.split, "loss": loss, "perplexity": math.exp(loss),
                      "model": str(args.model)}))


def _parse_ks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise KForcingError(f"--k expects comma-separated integers, got '{text}'") from None
    if not ks:
        raise KForcingError("--k is empty")
    return ks


def _same_vocab(a, b) -> bool:
    return a.get_vocab(with_added_tokens=True) == b.get_vocab(with_added_tokens=True)


def cmd_eval_students(args) -> None:
    from kforcing.io.checkpoint import atomic_write_json, load_model, resolve_model_dir
    from kforcing.cli.main import student_tokenizer
    from kforcing.core.config import load_json
    from kforcing.io.data import TokenFile, load_tokenizer
    from kforcing.training.distill import STUDENT_JSON, load_student, resolve_student_dir
    from kforcing.evaluation.evaluate import eval_markdown, evaluate, load_judge

    cfg = EvalConfig(tau=args.tau, new_tokens=args.new_tokens, prompts=args.prompts,
                     prompt_len=args.prompt_len, context_len=args.context_len,
                     windows=args.windows, tv_contexts=args.tv_contexts, tv_draws=args.tv_draws,
                     samples=args.samples, batch_size=args.batch_size, seed=args.seed)
    ks = _parse_ks(args.k)
    data = Path(args.data)
    tokens = TokenFile(data / f"{args.split}.bin")
    metas = [load_json(resolve_student_dir(p) / STUDENT_JSON) for p in args.student]
    teacher_path = resolve_model_dir(args.teacher or metas[0]["teacher"])
    teacher = load_model(teacher_path, device=args.device).eval()
    tok = load_tokenizer(student_tokenizer(args.student[0]))
    if (data / "tokenizer.json").is_file() and not _same_vocab(
            tok, load_tokenizer(data / "tokenizer.json")):
        raise KForcingError(f"the student's tokenizer differs from the one of {data}: "
                            "mismatched tokenizer")
    runs, run_metas = [], []
    for path, meta in zip(args.student, metas, strict=True):
        student = load_student(path, device=args.device)
        for k in ks or [int(meta.get("k", student.config.max_k))]:
            runs.append((str(path), student, k))
            run_metas.append(meta)
    judge, judge_info = load_judge(args.judge, cache=args.cache, device=args.device)
    result = evaluate(teacher, tokens, runs, cfg=cfg, tokenizer=tok, judge=judge,
                      progress=not args.quiet)
    result = {"command": _command(args), "data": str(data), "split": args.split,
              "teacher_path": str(teacher_path), "judge": judge_info, **result}
    for entry, meta in zip(result["students"], run_metas, strict=True):
        entry["trained_k"] = meta.get("k")
        entry["step"] = meta.get("step")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(eval_markdown(result), encoding="utf-8")
    if args.out:
        atomic_write_json(Path(args.out), result)
        print(eval_markdown(result))
    else:
        print(json.dumps(result))


def _command(args) -> str:
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


def register(sub, commands) -> None:
    sp = sub.add_parser("eval", help="perplexity of a model on a split, or K-Forcing students "
                                     "against their teacher (match, TV, samples) as JSON")
    sp.add_argument("--model", help="perplexity mode: model or run directory")
    sp.add_argument("--student", action="append",
                    help="student mode: a student directory (repeatable)")
    sp.add_argument("--teacher", help="the students' teacher (default: the first one's own)")
    sp.add_argument("--data", required=True, help="prepared corpus directory")
    sp.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    sp.add_argument("--out", help="student mode: JSON file (default: print the JSON)")
    sp.add_argument("--markdown", help="student mode: also write the tables to this file")
    sp.add_argument("--k", help="windows, e.g. 2,4 (default: the k each student was trained at)")
    sp.add_argument("--tau", type=float, default=D.tau)
    sp.add_argument("--new-tokens", type=int, default=D.new_tokens)
    sp.add_argument("--prompts", type=int, default=D.prompts, help="held-out prompts")
    sp.add_argument("--prompt-len", type=int, default=D.prompt_len)
    sp.add_argument("--context-len", type=int, default=D.context_len,
                    help="held-out context length for match and TV")
    sp.add_argument("--windows", type=int, default=D.windows, help="match windows")
    sp.add_argument("--tv-contexts", type=int, default=D.tv_contexts)
    sp.add_argument("--tv-draws", type=int, default=D.tv_draws, help="uniforms per TV context")
    sp.add_argument("--samples", type=int, default=D.samples, help="decoded samples kept")
    sp.add_argument("--judge", default="smollm2",
                    help="independent judge LM: smollm2, a .gguf file, or none")
    sp.add_argument("--cache", help="cache directory for the judge (default: $KFORCING_CACHE "
                                    "or ./.cache)")
    sp.add_argument("--seed", type=int, default=D.seed)
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.add_argument("--block-size", type=int, default=256, help="perplexity mode")
    sp.add_argument("--batch-size", type=int, default=D.batch_size)
    sp.add_argument("--max-batches", type=int, default=None, help="perplexity mode")
    sp.add_argument("--device", default="cpu")
    commands["eval"] = cmd_eval
