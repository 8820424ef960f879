"""The one cache root (prepared corpora, downloads, calibrations): the argument, else
$KFORCING_CACHE, else ./.cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(path: str | Path | None = None) -> Path:
    """The cache root: the argument, else $KFORCING_CACHE, else ./.cache. Created if missing."""
    root = Path(path or os.environ.get("KFORCING_CACHE") or ".cache").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
