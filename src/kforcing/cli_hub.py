"""`kforcing import / fetch / chat` subcommands (registered by kforcing.cli)."""

from __future__ import annotations


def register(sub, commands) -> None:
    pass
