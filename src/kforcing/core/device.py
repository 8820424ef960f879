"""One place that turns a `--device` string into a device this torch install can use.

torch accepts any well-formed name (`cuda` on a CPU-only build, `mps` on Linux) and fails later,
deep inside the first tensor move, with a traceback; `check_device` fails first, in one sentence.
"""

from __future__ import annotations

import torch

from kforcing.errors import KForcingError

KINDS = ("cpu", "cuda", "mps")


def check_device(name: str | torch.device) -> str:
    """The canonical name of a usable device (`cpu`, `cuda`, `cuda:1`, `mps`), or KForcingError
    naming what is wrong: an unknown name, a CUDA device on a CPU-only build or beyond the
    device count, MPS where it is not available."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in KINDS:
        raise KForcingError(f"unknown device '{name}': use one of {', '.join(KINDS)} "
                            "(or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise KForcingError(f"device '{name}' is not available: {why} (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KForcingError(f"device '{name}' is not available: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KForcingError(f"device '{name}' is not available: MPS needs an Apple GPU and a "
                            "torch built with MPS (use --device cpu)")
    return str(dev)
