"""The `kforcing` command line."""

from kforcing.cli.main import main

__all__ = ["main"]
