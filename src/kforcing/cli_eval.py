"""`kforcing eval` subcommands (registered by kforcing.cli)."""

from __future__ import annotations

import json
from pathlib import Path

from kforcing.cli import _load


def cmd_eval(args) -> None:
    import math

    from kforcing.data import TokenFile
    from kforcing.train import evaluate_loss
    model, _ = _load(args)
    split = Path(args.data) / f"{args.split}.bin"
    loss = evaluate_loss(model, TokenFile(split), min(args.block_size, model.config.max_seq_len),
                         args.batch_size, args.max_batches, args.device)
    print(json.dumps({"split": args.split, "loss": loss, "perplexity": math.exp(loss),
                      "model": str(args.model)}))


def register(sub, commands) -> None:
    sp = sub.add_parser("eval", help="perplexity on a prepared split")
    sp.add_argument("--model", required=True)
    sp.add_argument("--data", required=True, help="prepared corpus directory")
    sp.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    sp.add_argument("--block-size", type=int, default=256)
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--max-batches", type=int, default=None)
    sp.add_argument("--device", default="cpu")
    commands["eval"] = cmd_eval
