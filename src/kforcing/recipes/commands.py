"""Command lines from configs: what a recipe records is rendered from the very config it runs, so
the recorded command and the run cannot drift apart (tests/test_cli.py parses every rendered
command back with the real parser and compares the configs)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Any

# config field -> flag name where they differ (`kforcing train --out` sets TrainConfig.out_dir)
FLAG_NAMES = {"out_dir": "out", "ks": "k", "model_overrides": "override",
              "draft_vocab_size": "draft_vocab"}


def command(name: str, *positional: Any, **flags: Any) -> str:
    """`kforcing NAME POSITIONAL... --flag value ...` with shell quoting. None and False are left
    out, True is a bare flag, a tuple is comma-joined, a dict is KEY=VALUE pairs comma-joined,
    a list repeats the flag once per item."""
    parts = ["kforcing", *name.split(), *map(str, positional)]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        elif isinstance(value, tuple):
            parts += [flag, ",".join(map(str, value))]
        elif isinstance(value, dict):
            parts += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def changed_fields(cfg: Any) -> dict[str, Any]:
    """The fields of a dataclass config that differ from its defaults, as command-line flags
    (nested configs flattened, renamed per FLAG_NAMES); the defaults are the parser's too."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        # the field's own default: some configs cannot be built from defaults alone
        base = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        value = getattr(cfg, f.name)
        if value == base:
            continue
        if dataclasses.is_dataclass(value):
            out.update(changed_fields(value))
        elif f.name == "model_overrides":
            # `--override key=value` reads the value as JSON when it parses
            out["override"] = [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                               for k, v in value.items()]
        else:
            out[FLAG_NAMES.get(f.name, f.name)] = value
    return out


def config_command(name: str, cfg: Any, *positional: Any, **extra: Any) -> str:
    """The `kforcing NAME` command that runs `cfg`: the `extra` flags (arguments that are not
    config fields, such as the models and data), then every field that differs from its
    default."""
    return command(name, *positional, **extra, **changed_fields(cfg))
