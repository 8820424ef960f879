"""K-Forcing: push-forward language models that emit k tokens per forward pass.

`kforcing.load(path)` / `kforcing.save(obj, path)` read and write shareable checkpoints
(kforcing.students.share); everything else lives in the subpackages, layered bottom to top:
core, io, students, decoding, evaluation, training, recipes, cli (docs/METHOD.md explains the
method they implement).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from kforcing.errors import KForcingError
from kforcing.students.share import load, save

try:
    __version__ = version("kforcing")
except PackageNotFoundError:   # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["KForcingError", "__version__", "load", "save"]
