"""`kforcing serve` (an OpenAI-compatible server that batches requests) and `kforcing
bench-serve` (its load test); docs/SERVING.md. Both need the `serve` extra:
pip install 'kforcing[serve]'.

`python -m kforcing.cli.serve serve ...` runs them without the rest of the command line (the
benchmark starts its server that way).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from kforcing.cli.common import count, device_flag, ints, k_or_auto, natural, non_negative
from kforcing.errors import KForcingError
from kforcing.serving.config import BenchServeConfig, ServeConfig
from kforcing.serving.schemas import MODES

try:   # the optional `serve` extra; without it both commands say how to install it
    from kforcing.serving import bench, server
    _MISSING = None
except ImportError as e:
    bench = server = None
    _MISSING = e.name


def _need_extra() -> None:
    if _MISSING is not None:
        raise KForcingError(f"this command needs the serve extra (module '{_MISSING}' is "
                            "missing): pip install 'kforcing[serve]'")


def cmd_serve(args) -> None:
    _need_extra()
    cfg = ServeConfig(model=args.model, host=args.host, port=args.port,
                      api_key=args.api_key or os.environ.get("KFORCING_API_KEY") or None,
                      mode=args.mode, k=args.k, max_batch=args.max_batch,
                      batch_wait_ms=args.batch_wait_ms, device=args.device,
                      name=args.name, grace_s=args.grace, max_body=args.max_body,
                      autok_cache=args.cache, log_level=args.log_level,
                      compile=args.compile)
    server.serve(cfg)


def cmd_bench_serve(args) -> None:
    _need_extra()
    if (args.model is None) == (args.url is None):
        raise KForcingError("bench-serve needs exactly one of --model DIR (start a server) "
                            "and --url URL (a running server)")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise KForcingError(f"--modes: expected a comma list of {', '.join(MODES)}, got "
                            f"'{args.modes}'")
    cfg = BenchServeConfig(modes=modes, concurrency=ints(args.concurrency, "--concurrency"),
                           requests=args.requests, max_tokens=args.max_tokens,
                           temperature=args.temperature, warmup=args.warmup,
                           rounds=args.rounds)
    log = lambda line: print(line, file=sys.stderr, flush=True)   # noqa: E731
    if args.url:
        model = bench.served_model_id(args.url, args.api_key)
        rows = bench.bench_serve(args.url, model, cfg, api_key=args.api_key, log=log)
        server_args: list[str] = []
    else:
        server_args = ["--k", str(args.k), "--max-batch", str(args.max_batch),
                       "--batch-wait-ms", str(args.batch_wait_ms), "--device", args.device]
        rows, model = bench.run_with_server(args.model, server_args, cfg, log=log)
    meta = {"command": "kforcing " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "model": model, "model_dir": args.model, "url": args.url,
            "server_args": server_args, "config": bench.config_dict(cfg)}
    bench.write_rows(args.out, rows, meta)
    print(json.dumps({"out": args.out, "rows": len(rows)}))


def add_parser(sub) -> None:
    defaults = ServeConfig(model="")
    sp = sub.add_parser("serve", help="OpenAI-compatible HTTP server with batching and a "
                        "playground page (needs the serve extra)")
    sp.add_argument("--model", required=True, help="teacher, student or shareable directory")
    sp.add_argument("--host", default=defaults.host,
                    help="address to bind (default: loopback only)")
    sp.add_argument("--port", type=natural, default=defaults.port)
    sp.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (default: $KFORCING_API_KEY, "
                    "else no key)")
    sp.add_argument("--mode", choices=MODES, default=None,
                    help="default decoding mode (a request may choose another): ar for a "
                    "teacher, kforcing for a student")
    sp.add_argument("--k", type=k_or_auto, default=None,
                    help="default tokens per pass: N, or 'auto' (per batch size, "
                    "docs/AUTOK.md); default: the checkpoint's max_k")
    sp.add_argument("--max-batch", type=count, default=defaults.max_batch,
                    help="most requests decoded together")
    sp.add_argument("--batch-wait-ms", type=non_negative, default=defaults.batch_wait_ms,
                    help="when fewer requests wait than the last wave had, wait up to this "
                    "long for more before starting the next wave (0: start at once)")
    sp.add_argument("--name", default=None,
                    help="model id clients send (default: the directory's name)")
    sp.add_argument("--grace", type=non_negative, default=defaults.grace_s,
                    help="seconds requests in flight may still run after SIGTERM")
    sp.add_argument("--max-body", type=count, default=defaults.max_body,
                    help="largest request body in bytes (larger: 413)")
    sp.add_argument("--cache", default=None,
                    help="cache directory for the --k auto calibration (default: "
                    "$KFORCING_CACHE or ./.cache)")
    sp.add_argument("--log-level", default=defaults.log_level,
                    choices=["critical", "error", "warning", "info", "debug"])
    sp.add_argument("--compile", action="store_true",
                    help="AR waves and a token-feedback student's K-Forcing windows through "
                    "torch.compile graphs, compiled at start-up (tens of seconds; "
                    "docs/RESULTS.md measures when it pays)")
    device_flag(sp)
    sp.set_defaults(run=cmd_serve)

    bdef = BenchServeConfig()
    sp = sub.add_parser("bench-serve", help="load-test `kforcing serve` over loopback: "
                        "tokens/s, latency, errors per mode and concurrency")
    sp.add_argument("--model", help="start a server on this model (127.0.0.1, a free port)")
    sp.add_argument("--url", help="or benchmark a running server, e.g. http://127.0.0.1:8000")
    sp.add_argument("--api-key", default=None, help="the running server's key (--url)")
    sp.add_argument("--modes", default=",".join(bdef.modes))
    sp.add_argument("--concurrency", default=",".join(map(str, bdef.concurrency)),
                    help="comma list of concurrent clients")
    sp.add_argument("--requests", type=count, default=bdef.requests,
                    help="requests per mode and concurrency")
    sp.add_argument("--max-tokens", type=count, default=bdef.max_tokens)
    sp.add_argument("--temperature", type=non_negative, default=bdef.temperature)
    sp.add_argument("--warmup", type=natural, default=bdef.warmup,
                    help="uncounted requests per mode first")
    sp.add_argument("--rounds", type=count, default=bdef.rounds,
                    help="split each concurrency's cells into this many rounds in which the "
                    "modes take turns, so drift in the machine's speed hits every mode alike")
    sp.add_argument("--k", type=k_or_auto, default="auto", help="the server's --k (--model)")
    sp.add_argument("--max-batch", type=count, default=128,
                    help="the server's --max-batch (--model)")
    sp.add_argument("--batch-wait-ms", type=non_negative, default=defaults.batch_wait_ms,
                    help="the server's --batch-wait-ms (--model)")
    sp.add_argument("--out", default="docs/results/serve.json")
    device_flag(sp)
    sp.set_defaults(run=cmd_bench_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kforcing")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KForcingError as e:
        print(f"kforcing: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
