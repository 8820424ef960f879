"""`kforcing bench` subcommands (registered by kforcing.cli)."""

from __future__ import annotations


def cmd_bench(args) -> None:
    from kforcing.bench import main as bench_main
    bench_main(args)


def register(sub, commands) -> None:
    sp = sub.add_parser("bench", help="decode speed: ours vs HF generate, or K-Forcing vs AR")
    sp.add_argument("--model", help="model directory (default: a random `small` model)")
    sp.add_argument("--student", help="K-Forcing student: benchmark it against AR decoding")
    sp.add_argument("--k", default="4", help="comma-separated k values (with --student)")
    sp.add_argument("--batch-sizes", default="1,16")
    sp.add_argument("--new-tokens", type=int, default=256)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    sp.add_argument("--out", default="docs/bench", help="where JSON and plots go")
    commands["bench"] = cmd_bench
