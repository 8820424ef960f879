"""`k="auto"`: choose the window k per batch size from a short on-machine calibration.

A K-Forcing pass reads 2k positions and emits k tokens; an AR step reads one position and emits
one token. While the matrix products are memory-bound (small batches) the wider pass is nearly
free and large k wins; once they are compute-bound (large batches, CPUs) it is not. So for each
batch size the real decoders (generate_ar, generate_kforcing, generate_feedback) generate a few
tokens on this machine, `repeats` times per candidate k after a warm-up run (the candidates take
turns, so a change in load hits them all alike), and the k with the most generated tokens per
second wins. k = 1 means plain AR decoding; it is kept unless some k beats it by more than
`margin` in the median AND in most rounds (the noise check: faster than AR's run of the same
round in more than half of them), so auto falls back to AR whenever the timings leave doubt. It also
falls back to AR when the process was preempted during the calibration (kforcing.decoding.
machine: it got too little CPU time), and a k read from the cache of another process is
re-timed once against AR in the process it serves before it is used.
The choice looks at decode speed only, not at how closely the student follows its teacher.
Results are cached per machine, architecture, dtype and device (docs/AUTOK.md).
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

from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import generate_feedback
from kforcing.decoding.kforcing import generate_kforcing
from kforcing.decoding.machine import MIN_CPU_SHARE, Watch
from kforcing.errors import KForcingError
from kforcing.io.cache import cache_dir
from kforcing.io.checkpoint import atomic_write_json
from kforcing.students.feedback import FeedbackStudent
from kforcing.students.pushforward import PushForward

CACHE_FILE = "autok.json"
MARGIN = 0.15  # a k must beat AR by 15%: timings on a loaded VM move by 10-30% (docs/AUTOK.md)
CONTEXT = 64           # prompt tokens during calibration (a typical mid-generation context)
NEW_TOKENS = 32        # generated tokens per calibration run
# bumped when the calibration measures something else: older cache entries are measured again
# (2: decode time only, 32 tokens; 1 timed prefill too, over 16 tokens, which hid most of a k's
# gain at batch 1 behind the fixed prefill cost)
CALIBRATION = 2
REPEATS = 3            # timed runs per candidate, after one warm-up run
SPEED_ONLY = ("k='auto' looks at decode speed only, not at how closely the student follows its "
              "teacher: pick k by hand when fidelity matters more")

# timer(student, batch_size, ks, context) -> {k: generated tokens/s of each repeat}, k = 1: AR
Timer = Callable[[object, int, list[int], int], dict[int, list[float]]]


# -- the rule -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pick:
    k: int          # 1 = plain AR decoding
    reason: str     # why, in one sentence


def as_runs(table: dict[int, list[float] | float]) -> dict[int, list[float]]:
    """{k: tokens/s of each run}; a single number is one run."""
    return {int(k): [float(v)] if isinstance(v, int | float) else [float(x) for x in v]
            for k, v in table.items()}


def pick_k(runs: dict[int, list[float] | float], margin: float = MARGIN) -> Pick:
    """The k with the most tokens/s (median over repeats, ties to the smaller k); AR (k = 1)
    unless that k beats AR by more than `margin` and passes the noise check. Runs listed in
    rounds (run i of every k timed in round i, as measure_tokens_per_s takes turns) are
    compared round by round, so a drift of the machine between rounds does not count as noise:
    the k must beat AR's run of the same round in most rounds. Otherwise each of its runs must
    beat each of AR's."""
    if 1 not in runs:
        raise KForcingError("a timing table needs the AR entry (k = 1)")
    runs = as_runs(runs)
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = min(med, key=lambda k: (-med[k], k))
    if best == 1:
        return Pick(1, f"AR was the fastest ({med[1]:.1f} tokens/s)")
    gain = med[best] / med[1] - 1
    if gain <= margin:
        return Pick(1, f"k={best} beat AR by only {100 * gain:.0f}% (margin "
                       f"{100 * margin:.0f}%): AR")
    mine, ar = runs[best], runs[1]
    if len(mine) == len(ar) > 1:
        won = sum(x > y for x, y in zip(mine, ar, strict=True))
        if 2 * won <= len(mine):
            return Pick(1, f"k={best} beat AR's run of the same round in only {won} of "
                           f"{len(mine)} rounds: timings too noisy, AR")
        check = f"faster than AR's run of the same round in {won} of {len(mine)} rounds"
    elif min(mine) <= max(ar):
        return Pick(1, f"k={best}'s slowest run ({min(mine):.1f} tokens/s) was no faster "
                       f"than AR's fastest ({max(ar):.1f}): timings too noisy, AR")
    else:
        check = "every run faster than every AR run"
    return Pick(best, f"k={best} generated {med[best] / med[1]:.2f}x AR's tokens/s (median of "
                      f"{len(mine)} runs, {check})")


def candidate_ks(max_k: int) -> list[int]:
    """1 (AR), the powers of two up to max_k, and max_k itself."""
    ks = {1, max_k} | {2 ** i for i in range(1, max_k.bit_length()) if 2 ** i <= max_k}
    return sorted(ks)


def bucket(batch_size: int) -> int:
    """Batch sizes are calibrated at the next power of two (3 -> 4, 100 -> 128)."""
    if batch_size < 1:
        raise KForcingError(f"batch size must be >= 1, got {batch_size}")
    return 1 << (batch_size - 1).bit_length()


# -- calibration: the real decoders --------------------------------------------------------------

def ar_model(student):
    """The AR model behind a student with the same shapes (its context model / teacher)."""
    return student.teacher if isinstance(student, FeedbackStudent) else student.context_model


def decode_once(student, prompts: list[list[int]], k: int, new_tokens: int):
    """One calibration run: k = 1 decodes AR with the student's context model, larger k with
    the student's own decoder. EOS is ignored, so every run generates the same tokens."""
    if k == 1:
        return generate_ar(ar_model(student), prompts, new_tokens, stop_at_eos=False)
    if isinstance(student, FeedbackStudent):
        return generate_feedback(student, prompts, new_tokens, k=k, stop_at_eos=False)
    return generate_kforcing(student, prompts, new_tokens, k=k, stop_at_eos=False)


def measure_tokens_per_s(student, batch_size: int, ks: list[int], context: int = CONTEXT,
                         *, repeats: int = REPEATS, new_tokens: int = NEW_TOKENS
                         ) -> dict[int, list[float]]:
    """The default Timer: generated tokens/s of `repeats` runs per k, each candidate after one
    warm-up run, on random prompts of `context` tokens. Decode time only: the prefill (the
    teacher's, the same for every k) is left out, so a run measures what k changes."""
    cfg = ar_model(student).config
    kmax = max(ks)
    context = max(1, min(context, cfg.max_seq_len - new_tokens - 2 * kmax))
    new_tokens = min(new_tokens, cfg.max_seq_len - context - 2 * kmax)
    if new_tokens < 1:
        raise KForcingError(f"a context of {cfg.max_seq_len} tokens is too short to calibrate "
                            f"k up to {kmax}")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch_size, context), generator=g).tolist()
    out: dict[int, list[float]] = {k: [] for k in ks}
    for k in ks:
        decode_once(student, prompts, k, new_tokens)              # warm-up
    for _ in range(repeats):          # round robin: a load change hits every candidate
        for k in ks:
            res = decode_once(student, prompts, k, new_tokens)
            out[k].append(res.num_tokens / max(res.decode_seconds, 1e-9))
    return out


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
    return {"model": asdict(ar_model(student).config), "student": asdict(student.config),
            "kind": type(student).__name__}


def cache_key(student) -> str:
    """Machine, weights, dtype, device, calibration version, and which decoders run compiled:
    the teacher's AR step (Transformer.compile_decode, '-compiled') and a feedback student's
    K-Forcing window (feedback_window.compile_window, '-window'). Either changes which k wins."""
    p = next(student.parameters())
    mach = {k: v for k, v in machine_info().items() if k != "python"}
    compiled = getattr(getattr(student, "teacher", None), "compiled_step", None) is not None
    window = getattr(student, "compiled_window", None) is not None
    return "-".join([_short_hash(mach), _short_hash(model_fingerprint(student)),
                     str(p.dtype).removeprefix("torch."), p.device.type, f"c{CALIBRATION}"]
                    + (["compiled"] if compiled else []) + (["window"] if window else []))


# -- the cached decision ------------------------------------------------------------------------

@dataclass
class AutoChoice:
    k: int                              # 1 = plain AR decoding
    reason: str                         # why this k, in one sentence
    batch_size: int
    bucket: int                         # the calibrated batch size it was read from
    tokens_per_s: dict[int, float]      # median generated tokens/s per k (1 = AR)
    runs: dict[int, list[float]]        # every timed run per k
    cached: bool                        # read from the cache file, not measured now
    key: str
    note: str = SPEED_ONLY
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What a result records about the choice."""
        return {"k": self.k, "reason": self.reason, "note": self.note,
                "tokens_per_s": {str(k): round(v, 1) for k, v in self.tokens_per_s.items()},
                "calibrated_batch": self.bucket, "from_cache": self.cached}


def _load_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}      # a damaged cache is only lost timing: recalibrate
    return data if isinstance(data, dict) else {}


def _cached_runs(rec: dict | None, ks: list[int]) -> dict[int, list[float]] | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("runs"), dict):
        return None
    runs = as_runs(rec["runs"])
    return runs if sorted(runs) == ks else None


# (cache file, key, bucket) whose choice was timed in this process: a cached k is re-checked
# against AR once per process before it is trusted
_CHECKED: set[tuple[str, str, int]] = set()


def _preempted(usage: dict | None) -> bool:
    return bool(usage) and usage.get("cpu_share", 1.0) < MIN_CPU_SHARE \
        and usage.get("wall_seconds", 0.0) > 0.05


def _untrusted(usage: dict | None) -> bool:
    """A calibration not to reuse: preempted, or timed while the machine was busy (its runs are
    noisy: other processes share the memory bus even when they leave this core alone)."""
    return _preempted(usage) or bool((usage or {}).get("busy"))


def choose_k(student, batch_size: int, *, cache: str | Path | None = None,
             recalibrate: bool = False, margin: float = MARGIN, context: int = CONTEXT,
             timer: Timer | None = None) -> AutoChoice:
    """The k for this batch size: from <cache>/autok.json, or calibrated now and saved there.
    AR (k = 1) when the calibration was preempted, and when a cached k does not beat AR again
    in this process."""
    if not isinstance(student, PushForward | FeedbackStudent):
        raise KForcingError("k='auto' needs a K-Forcing student; a plain AR model decodes "
                            "one token per pass (k = 1)")
    path = cache_dir(cache) / CACHE_FILE
    key = cache_key(student)
    b = bucket(batch_size)
    entry = _load_cache(path).get(key, {})
    ks = candidate_ks(student.config.max_k)
    rec = entry.get("batches", {}).get(str(b))
    runs = None if recalibrate or _untrusted((rec or {}).get("usage")) else _cached_runs(rec, ks)
    cached = runs is not None
    timer = timer or measure_tokens_per_s
    memo = (str(path), key, b)
    usage = None
    if runs is None:
        watch = Watch(torch.get_num_threads())
        runs = as_runs(timer(student, b, ks, context))
        usage = watch.stop().record()
        _CHECKED.add(memo)
        rec = {"runs": {str(k): v for k, v in runs.items()},
               "tokens_per_s": {str(k): statistics.median(v) for k, v in runs.items()},
               "context": context, "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "usage": usage}
        data = _load_cache(path)          # another process may have added entries meanwhile
        old = data.get(key, {})
        data[key] = {**old, "machine": machine_info(), "architecture": model_fingerprint(student),
                     "batches": {**old.get("batches", {}), str(b): rec}}
        atomic_write_json(path, data)
    pick = pick_k(runs, margin)
    reason = pick.reason + (" (calibration read from the cache)" if cached else "")
    if _preempted(usage):
        pick = Pick(1, f"the process got only {usage['cpu_share']:.2f} CPU seconds per second "
                       "while calibrating (a busy machine): AR")
        reason = pick.reason
    elif cached and pick.k != 1 and memo not in _CHECKED:
        again = pick_k(as_runs(timer(student, b, [1, pick.k], context)), margin)
        _CHECKED.add(memo)
        if again.k == 1:
            pick = Pick(1, f"the cached k={pick.k} did not beat AR again in this process "
                           f"({again.reason}): AR")
            reason = pick.reason
    return AutoChoice(pick.k, reason, batch_size, b,
                      {k: statistics.median(v) for k, v in runs.items()}, runs, cached, key,
                      extra={"cache": str(path), "margin": margin})
