"""`--k auto`: choose the window k per batch size from a short on-machine calibration.

A K-Forcing pass reads 2k positions and emits k tokens; an AR step reads one position and emits
one token. While the matrix products are memory-bound (small batches) the wider pass is nearly
free and large k wins; once they are compute-bound (large batches, CPUs) it is not. So for each
batch size we time one AR step and one K-Forcing pass per candidate k on this machine, convert
them to generated tokens per second (B / t_ar and B * k / t_k), and take the best. k = 1 means
plain AR decoding, chosen whenever no k beats it by more than `margin`, so auto is never slower
than AR up to measurement noise. Results are cached per machine, architecture, dtype and device
(docs/AUTOK.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kforcing.io.checkpoint import atomic_write_json
from kforcing.errors import KForcingError
from kforcing.decoding.generate import _sync_fn
from kforcing.core.kv_cache import KVCache
from kforcing.core.sampling import SamplingConfig, make_generator, sample, uniforms

CACHE_FILE = "autok.json"
MARGIN = 0.15  # a k must beat AR by 15%: a one-pass calibration misses prefill, sampling and
               # per-step overhead, and timings on a loaded VM move by 10-30% (docs/AUTOK.md)
CONTEXT = 64           # cached tokens during calibration (a typical mid-generation context)

# timer(student, batch_size, ks, context) -> {k: generated tokens/s}, k = 1 meaning AR
Timer = Callable[[object, int, list[int], int], dict[int, float]]


# -- the rule -----------------------------------------------------------------------------------

def pick_k(tokens_per_s: dict[int, float], margin: float = MARGIN) -> int:
    """The k with the most tokens/s; AR (k = 1) unless some k beats it by more than `margin`.
    Ties go to the smaller k."""
    if 1 not in tokens_per_s:
        raise KForcingError("a timing table needs the AR entry (k = 1)")
    best = min(tokens_per_s, key=lambda k: (-tokens_per_s[k], k))
    if best != 1 and tokens_per_s[best] <= tokens_per_s[1] * (1 + margin):
        return 1
    return best


def candidate_ks(max_k: int) -> list[int]:
    """1 (AR), the powers of two up to max_k, and max_k itself."""
    ks = {1, max_k} | {2 ** i for i in range(1, max_k.bit_length()) if 2 ** i <= max_k}
    return sorted(ks)


def bucket(batch_size: int) -> int:
    """Batch sizes are calibrated at the next power of two (3 -> 4, 100 -> 128)."""
    if batch_size < 1:
        raise KForcingError(f"batch size must be >= 1, got {batch_size}")
    return 1 << (batch_size - 1).bit_length()


# -- calibration ---------------------------------------------------------------------------------

@torch.inference_mode()
def time_passes(student, batch_size: int, ks: list[int], context: int = CONTEXT,
                steps: int = 4, seed: int = 0) -> dict[int, float]:
    """Median seconds of one decode pass per k (k = 1: an AR step of the context model), each
    after one warm-up pass, all on one prefilled cache that is rolled back between candidates."""
    ctx = student.context_model
    cfg = ctx.config
    device = next(ctx.parameters()).device
    sync = _sync_fn(device)
    kmax = max(ks)
    if context + (steps + 1) * kmax + 2 * kmax > cfg.max_seq_len:
        context = max(1, cfg.max_seq_len - (steps + 1) * kmax - 2 * kmax)
    gen = make_generator(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, context), generator=gen).to(device)
    pos = torch.arange(context, device=device).expand(batch_size, -1)
    cache = KVCache.for_model(ctx, batch_size, max_len=context + (steps + 1) * kmax + 2 * kmax)
    logits = ctx(ids, input_pos=pos, cache=cache, last_only=True)[:, -1]
    tau = torch.ones(batch_size, dtype=torch.float64, device=device)
    sampling = SamplingConfig(temperature=1.0)
    out: dict[int, float] = {}
    for k in ks:
        cache.truncate(context)
        last = pos[:, -1:]
        times = []
        for _ in range(steps + 1):          # the first pass is the warm-up
            t = time.perf_counter()
            if k == 1:
                tok = sample(logits, uniforms((batch_size,), gen).to(device), sampling)
                logits = ctx(tok[:, None], input_pos=last + 1, cache=cache)[:, -1]
                last = last + 1
            else:
                real = torch.randint(0, cfg.vocab_size, (batch_size, k), generator=gen).to(device)
                real_pos = last + torch.arange(1, k + 1, device=device)
                u = uniforms((batch_size, k), gen).to(device)
                student.window_pass(cache, real, real_pos, u, tau)
                last = real_pos[:, -1:]
            sync()
            times.append(time.perf_counter() - t)
        out[k] = statistics.median(times[1:])
    return out


def measure_tokens_per_s(student, batch_size: int, ks: list[int], context: int = CONTEXT
                         ) -> dict[int, float]:
    """The default Timer: generated tokens/s per k from `time_passes`."""
    secs = time_passes(student, batch_size, ks, context)
    return {k: batch_size * k / s for k, s in secs.items()}


# -- cache keys ---------------------------------------------------------------------------------

def machine_info() -> dict:
    """What decides decode speed on this machine (recorded with every benchmark row too)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": affinity,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(terse=True), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(student) -> dict:
    """The architecture: decode speed depends on shapes, not on the trained values, so a
    retrained checkpoint of the same architecture reuses its calibration."""
    return {"model": asdict(student.model_config), "student": asdict(student.config)}


def cache_key(student) -> str:
    p = next(student.parameters())
    mach = {k: v for k, v in machine_info().items() if k != "python"}
    return "-".join([_short_hash(mach), _short_hash(model_fingerprint(student)),
                     str(p.dtype).removeprefix("torch."), p.device.type])


# -- the cached decision ------------------------------------------------------------------------

@dataclass
class AutoChoice:
    k: int                              # 1 = plain AR decoding
    batch_size: int
    bucket: int                         # the calibrated batch size it was read from
    tokens_per_s: dict[int, float]      # calibration: generated tokens/s per k (1 = AR)
    cached: bool                        # read from the cache file, not measured now
    key: str
    extra: dict = field(default_factory=dict)


def _load_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}      # a damaged cache is only lost timing: recalibrate
    return data if isinstance(data, dict) else {}


def choose_k(student, batch_size: int, *, cache: str | Path | None = None,
             recalibrate: bool = False, margin: float = MARGIN, context: int = CONTEXT,
             timer: Timer | None = None) -> AutoChoice:
    """The k for this batch size: from <cache>/autok.json, or calibrated now and saved there."""
    from kforcing.io.data import cache_dir

    if not hasattr(student, "window_pass"):
        raise KForcingError("--k auto needs a K-Forcing student; a plain AR model decodes "
                            "one token per pass (k = 1)")
    path = cache_dir(cache) / CACHE_FILE
    key = cache_key(student)
    b = bucket(batch_size)
    data = _load_cache(path)
    entry = data.get(key, {})
    rec = entry.get("batches", {}).get(str(b))
    ks = candidate_ks(student.config.max_k)
    cached = rec is not None and not recalibrate and sorted(map(int, rec["tokens_per_s"])) == ks
    if cached:
        table = {int(k): float(v) for k, v in rec["tokens_per_s"].items()}
    else:
        table = (timer or measure_tokens_per_s)(student, b, ks, context)
        entry = {"machine": machine_info(), "architecture": model_fingerprint(student),
                 "batches": {**entry.get("batches", {}),
                             str(b): {"tokens_per_s": {str(k): v for k, v in table.items()},
                                      "context": context,
                                      "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}}}
        data = _load_cache(path)          # another process may have added entries meanwhile
        data[key] = {**data.get(key, {}), **entry}
        atomic_write_json(path, data)
    return AutoChoice(pick_k(table, margin), batch_size, b, table, cached, key,
                      {"cache": str(path), "margin": margin})


@dataclass
class AutoDecoder:
    model: object            # what to decode with: the student, or its teacher for plain AR
    k: int | None            # pass to generate(); None for plain AR
    choice: AutoChoice | None


def auto_decoder(model, batch_size: int, *, model_dir: str | Path | None = None,
                 cache: str | Path | None = None) -> AutoDecoder:
    """Resolve `--k auto` for `generate`: a student decodes with the calibrated k; when AR wins
    it decodes with its frozen teacher (exact AR sampling). A plain AR model is k = 1."""
    if not hasattr(model, "window_pass"):
        return AutoDecoder(model, None, None)
    choice = choose_k(model, batch_size, cache=cache)
    if choice.k > 1:
        return AutoDecoder(model, choice.k, choice)
    from kforcing.training.distill import teacher_of
    return AutoDecoder(teacher_of(model, model_dir), None, choice)
