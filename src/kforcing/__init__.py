"""K-Forcing: push-forward language models that emit k tokens per forward pass.

`kforcing.load(path)` / `kforcing.save(obj, path)` read and write shareable checkpoints
(kforcing.students.share); everything else lives in the submodules. Imports are lazy so that the CLI
starts without loading torch until a command needs it.
"""

from __future__ import annotations

__all__ = ["KForcingError", "load", "save"]


def __getattr__(name: str):
    if name in ("load", "save"):
        from kforcing.students import share
        return getattr(share, name)
    if name == "KForcingError":
        from kforcing.errors import KForcingError
        return KForcingError
    raise AttributeError(f"module 'kforcing' has no attribute {name!r}")
