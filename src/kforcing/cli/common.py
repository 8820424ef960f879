"""What the command modules share: argument types that refuse bad numbers at parse time, flags
whose defaults come from the library, and loading a model (or student) with its tokenizer."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kforcing.core.config import load_json
from kforcing.core.device import decode_weights
from kforcing.decoding.generate import compile_decoders as compile_model_decoders
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, tokenizer_path
from kforcing.io.tokenizers import load_tokenizer
from kforcing.students.store import is_student_dir, load_student, resolve_student_dir

# -- argument types: a bad number is an argparse usage error (exit 2) naming the flag ------------


def _number(text: str, kind: type, low: float | None, strict: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
    if not math.isfinite(value) or (low is not None and (value <= low if strict else value < low)):
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return value


def finite(text: str) -> float:
    return _number(text, float, None, False, "a finite number")


def positive(text: str) -> float:
    return _number(text, float, 0, True, "a finite number > 0")


def non_negative(text: str) -> float:
    return _number(text, float, 0, False, "a finite number >= 0")


def count(text: str) -> int:
    return _number(text, int, 1, False, "an integer >= 1")


def natural(text: str) -> int:
    return _number(text, int, 0, False, "an integer >= 0")


def k_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else _number(text, int, 1, False, "an integer >= 1 or 'auto'")


def path(text: str) -> str:
    """A file or directory argument: an empty one (an unset shell variable) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return text


def ints(text: str, flag: str, low: int = 1) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16), each >= low; anything else is one line naming the flag."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise KForcingError(f"{flag} expects comma-separated integers, got '{text}'") from None
    if not values:
        raise KForcingError(f"{flag} is empty: give comma-separated integers")
    if min(values) < low:
        raise KForcingError(f"{flag} values must be >= {low}, got {min(values)}")
    return values


def temperatures(text: str, flag: str) -> list[float]:
    """'1.0,0.7' -> [1.0, 0.7], each finite and > 0; anything else is one line naming the flag."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise KForcingError(f"{flag} expects comma-separated numbers, got '{text}'") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise KForcingError(f"{flag} expects temperatures > 0, got '{text}'")
    return values


def load_config(path: str) -> dict[str, Any]:
    """A --config file: a JSON object of config fields."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise KForcingError(f"{path} must hold a JSON object of config fields, got a "
                            f"{type(data).__name__}")
    return data


def key_value(text: str) -> tuple[str, Any]:
    """--override key=value: the value as JSON when it parses, else as a string."""
    if "=" not in text:
        raise KForcingError(f"--override expects key=value, got '{text}'")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# -- flags whose defaults are the library's ------------------------------------------------------


def default_of(owner: type | Callable, name: str) -> Any:
    """The default of a dataclass field or a function parameter: argparse shows it, so the
    command line and the library can never disagree."""
    if dataclasses.is_dataclass(owner):
        field = {f.name: f for f in dataclasses.fields(owner)}[name]
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        return field.default
    return inspect.signature(owner).parameters[name].default


def config_flags(sp: argparse.ArgumentParser, cls: type, flags: dict[str, Callable]) -> None:
    """One `--field-name` per dataclass field, default None: an unset flag leaves the field to
    the config file (--config) or the dataclass default, which --help states."""
    for name, typ in flags.items():
        sp.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                        help=f"default: {default_of(cls, name)}")


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The dataclass fields the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cache_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--cache", type=path,
                    help="cache directory (default: $KFORCING_CACHE or ./.cache)")


def device_flag(sp: argparse.ArgumentParser, default: str | None = "cpu") -> None:
    """`main` checks the value before the command runs (kforcing.core.device)."""
    sp.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N or mps (default: "
                    f"{default or 'the config file, else cpu'})")


# -- models with their tokenizers -----------------------------------------------------------------


def student_tokenizer(path: str | Path) -> Path:
    tok = resolve_student_dir(path) / "tokenizer.json"
    if not tok.is_file():
        raise KForcingError(f"no tokenizer.json next to the student in {path}")
    return tok


def load_with_tokenizer(path: str, device: str, *, allow_student: bool = False):
    """(model, tokenizer) from a model or run directory; a K-Forcing student when allowed. The
    model is in fp32 with its weights in the layout that decodes fastest (core.device.
    decode_weights)."""
    if allow_student and is_student_dir(path):
        model = load_student(path, device=device)
        vocab = model.model_config.vocab_size
        tok = load_tokenizer(student_tokenizer(path))
    else:
        model = load_model(path, device=device)
        vocab = model.config.vocab_size
        tok = load_tokenizer(tokenizer_path(path))
    if tok.get_vocab_size() > vocab:
        raise KForcingError(f"tokenizer has {tok.get_vocab_size()} tokens but the model only "
                            f"{vocab}: mismatched tokenizer")
    return decode_weights(model, torch.float32), tok


def print_json(obj: Any) -> None:
    print(json.dumps(obj))


def parse_tokens_at(text: str | None, flag: str) -> dict[int, int]:
    """'64=64,256=32' -> {64: 64, 256: 32} (per batch size new-token counts)."""
    if not text:
        return {}
    try:
        return {int(b): int(n) for b, n in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise KForcingError(f"{flag} expects BATCH=TOKENS pairs, e.g. 64=64,256=32") from None


def compile_decoders(model, teacher=None) -> None:
    """--compile on generate and chat: decoding.generate.compile_decoders, saying that the
    first passes compile."""
    compile_model_decoders(model, teacher)
    print("--compile: the first passes compile (tens of seconds); the first timing includes "
          "it", file=sys.stderr)
