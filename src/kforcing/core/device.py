"""Where and how a model decodes: the device (`check_device`), the dtype (`decode_dtype`) and
the memory order of its weights (`decode_layout`, `decode_weights`).

torch accepts any well-formed name (`cuda` on a CPU-only build, `mps` on Linux) and fails later,
deep inside the first tensor move, with a traceback; `check_device` fails first, in one sentence.
"""

from __future__ import annotations

from pathlib import Path

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


# -- weight layout ------------------------------------------------------------------------------

LAYOUTS = ("auto", "out-major", "in-major")


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of this CPU's last-level cache (read from sysfs; None where it cannot be)."""
    best: tuple[int, int] | None = None
    for d in Path(root).glob("index*"):
        try:
            level = int((d / "level").read_text())
            text = (d / "size").read_text().strip().upper()
            size = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(
                text[-1:], 1)
        except (OSError, ValueError):
            continue
        best = max(best or (level, size), (level, size))
    return None if best is None else best[1]


def decode_layout(name: str, dtype: torch.dtype, device: str | torch.device = "cpu",
                  weight_bytes: int | None = None) -> str:
    """How a linear layer's (out, in) weight sits in memory while decoding: out-major (torch's
    own: each output's row contiguous) or in-major (the transpose contiguous, seen through a
    transposed view, so `F.linear` is unchanged). auto: in-major for fp32 weights larger than
    the CPU's last-level cache, which a one-row product streams faster in-major (SmolLM2-135M:
    1.16x compiled AR decoding; docs/RESULTS.md, "Weight layout"); out-major elsewhere: a model
    the cache holds (the Brown teacher decoded 0.91x compiled in-major), bf16 (slower
    in-major on this project's CPU), GPUs (whose libraries take either)."""
    if name not in LAYOUTS:
        raise KForcingError(f"layout must be one of {', '.join(LAYOUTS)}, got '{name}'")
    if name != "auto":
        return name
    cache = last_level_cache_bytes()
    big = weight_bytes is not None and cache is not None and weight_bytes > cache
    return "in-major" if torch.device(device).type == "cpu" and dtype == torch.float32 and big \
        else "out-major"


def in_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


def layout_of(w: torch.Tensor) -> str:
    return "in-major" if in_major(w) else "out-major"


def laid_out(w: torch.Tensor, layout: str) -> torch.Tensor:
    """w (out, in) with the same values in `layout`'s memory order."""
    if layout == "in-major":
        return w if in_major(w) else w.t().contiguous().t()
    return w.contiguous()


def same_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t (a copy made from ref's rows, e.g. a draft vocabulary's slice of a head) in ref's
    layout."""
    return laid_out(t, layout_of(ref))


def arrange_weights(module: torch.nn.Module, layout: str) -> torch.nn.Module:
    """Put every linear weight of module (a tied output head, shared with its embedding, once)
    in `layout` (out-major or in-major), in place; values and results stay the same up to
    rounding. A student's frozen teacher goes along. Checkpoints are written contiguous
    (out-major) whatever the layout."""
    seen = set()
    for m in _linears(module):
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            with torch.no_grad():
                m.weight.data = laid_out(m.weight.data, layout)
    return module


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    held = getattr(module, "teacher", None)     # a student's frozen teacher is no submodule
    mods = [*module.modules(), *(held.modules() if isinstance(held, torch.nn.Module) else ())]
    return [m for m in mods if isinstance(m, torch.nn.Linear)]


def decode_weights(module: torch.nn.Module, dtype: torch.dtype, layout: str = "auto"
                   ) -> torch.nn.Module:
    """module cast to dtype with its weights in the layout that decodes fastest there
    (decode_layout), in place: what every decoding command does to the models it loads. The
    size that decides is the teacher's where module is a student holding one, so a student and
    its teacher, arranged one after the other, always agree."""
    module = module.to(dtype)
    held = getattr(module, "teacher", None)
    ws = {id(m.weight): m.weight
          for m in _linears(held if isinstance(held, torch.nn.Module) else module)}.values()
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    device = next(module.parameters()).device
    return arrange_weights(module, decode_layout(layout, dtype, device, nbytes))


def compile_options(device: str | torch.device) -> dict:
    """inductor's options for a compiled decode graph (Transformer.compile_decode,
    decoding.feedback_window.compile_window) on `device`. On a CPU: frozen weights, which the
    graph folds as constants, and a C++ wrapper around the kernels in place of the Python one,
    which made the Brown teacher's compiled AR 1.07x (batch 1) and 1.11x (batch 16) faster and
    its K-Forcing windows 1.18x (docs/RESULTS.md, "The C++ wrapper"). Elsewhere: none."""
    return {"freezing": True, "cpp_wrapper": True} if torch.device(device).type == "cpu" else {}
