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


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products run in hardware here: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; False where it cannot be read).
    Without them torch emulates bf16 on a CPU, slower than fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DECODE_DTYPES = ("auto", "fp32", "bf16")


def decode_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """fp32, bf16, or auto: bf16 where the hardware computes it natively (native_bf16), else
    fp32. Measured on an AMX CPU (docs/RESULTS.md): bf16 decodes SmolLM2 as fast as fp32 at one
    token, and a k-token window costs 1.08 one-token steps in bf16 against 1.82 in fp32."""
    if name not in DECODE_DTYPES:
        raise KForcingError(f"dtype must be one of {', '.join(DECODE_DTYPES)}, got '{name}'")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32
