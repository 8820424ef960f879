"""`kforcing` command line: the table of command groups and `main`.

Every command is a thin call into the library. Errors: a KForcingError (bad input, missing or
corrupt file) or an OSError on a user's path is one line `kforcing: error: ...` and exit 1; any
other exception is a bug: its traceback goes to a log file under <cache>/logs/, and the one line
names that file.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from kforcing import __version__
from kforcing.cli import (
    bench,
    chat,
    data,
    distill,
    evaluate,
    generate,
    hub,
    recipes,
    serve,
    train,
)
from kforcing.core.device import check_device
from kforcing.errors import KForcingError
from kforcing.io.cache import cache_dir

# one module per command group, each with add_parser(sub); this order is --help's order
GROUPS = (data, train, distill, generate, chat, evaluate, bench, serve, hub, recipes)


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """The whole command line, built once per process (argparse takes a noticeable fraction
    of a second to format some 200 flags)."""
    p = argparse.ArgumentParser(prog="kforcing",
                                description="K-Forcing: k tokens per forward pass")
    p.add_argument("--version", action="version", version=f"kforcing {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            args.device = check_device(args.device)
        args.run(args)
    except KForcingError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("kforcing: interrupted (resume with the same command plus --resume where it "
              "applies)", file=sys.stderr)
        return 130
    except (MemoryError, torch.cuda.OutOfMemoryError) as e:
        return _error(f"out of memory ({_first_line(e)}): use a smaller batch, model or "
                      "context")
    except OSError as e:
        if e.filename is None:   # not about a path the user gave: treat it as a bug
            return _bug(e, argv, args)
        return _error(f"{e.strerror or _first_line(e)}: {e.filename}")
    except Exception as e:
        return _bug(e, argv, args)
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _error(message: str) -> int:
    print(f"kforcing: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _bug(e: Exception, argv: list[str], args: argparse.Namespace) -> int:
    """An unexpected exception: the traceback into a log file, one line naming it."""
    report = (f"kforcing {__version__}, torch {torch.__version__}, python "
              f"{sys.version.split()[0]}\ncommand: kforcing {' '.join(argv)}\n\n"
              + "".join(traceback.format_exception(e)))
    name = f"kforcing-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        logs = cache_dir(getattr(args, "cache", None)) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / name
        path.write_text(report, encoding="utf-8")
    except OSError:   # an unwritable cache: the system temp directory
        path = Path(tempfile.gettempdir()) / name
        try:
            path.write_text(report, encoding="utf-8")
        except OSError:
            path = Path("(nowhere: no writable log directory)")
    return _error(f"internal error ({type(e).__name__}: {_first_line(e)}); this is a bug: "
                  f"please report it with the traceback in {path}")


if __name__ == "__main__":
    sys.exit(main())
