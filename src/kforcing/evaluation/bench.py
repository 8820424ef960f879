"""Decode-speed benchmarks (docs/METHOD.md section 10): generated tokens/s across the batch and the
latency of one forward pass, by batch size, for

- `ar`            our KV-cache AR decoding of the teacher (the baseline of every speedup);
- `kforcing`      K-Forcing decoding with a fixed k (1, 2, 4, 8 up to the student's max_k);
- `kforcing-auto` `--k auto` (kforcing.decoding.autok): k chosen per batch size by calibration;
- `lossless`      lossless mode (kforcing.decoding.lossless), exact teacher samples;
- `hf-generate`   transformers `generate` on the same weights exported through kforcing.io.hf,
                  greedy and sampling;
- `hf-assisted`   transformers assisted generation with a small draft model trained on the
                  same corpus (transformers supports it at batch size 1 only).
- `ar-compiled`, `kforcing-compiled` (only when asked for): AR and K-Forcing mode through the
                  compiled graphs of Transformer.compile_decode / FeedbackStudent.compile_draft.

Every configuration: one short warm-up run (excluded), then up to `repeats` timed runs (fewer
when `max_seconds` is used up; the count is recorded), median reported, EOS ignored so every
run generates exactly `new_tokens` tokens per row. Output: JSON lines, one object per measured
configuration, a meta JSON (machine, command, skipped configurations) and two plots.

Every row's `machine` records the 1-minute load average before (`load_avg_1m`) and after the
configuration, the CPU seconds the process got for its wall seconds, and `busy` with the
reasons when the machine was shared (kforcing.evaluation.bench_machine); the meta JSON carries
one loud warning when any row was busy. With `roofline` on, a short calibration of this machine
in the benchmarked dtype, before and after the rows (the faster counts), gives each ar /
kforcing row its roofline bound and the measured fraction of it (kforcing.evaluation.
roofline), and the meta JSON the per-method summary with both calibrations.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kforcing.core.device import decode_layout, layout_of
from kforcing.core.model import Transformer
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.autok import choose_k, machine_info
from kforcing.decoding.common import GenerationResult
from kforcing.decoding.generate import generate
from kforcing.decoding.machine import Watch
from kforcing.errors import KForcingError
from kforcing.evaluation.bench_compiled import lend_compiled
from kforcing.evaluation.bench_inputs import make_prompts, ready_models
from kforcing.evaluation.bench_machine import busy_warning, usable_cores
from kforcing.evaluation.bench_plot import plot, series_label
from kforcing.evaluation.bench_report import (
    add_roofline,
    calibrate_for,
    dtype_winners,
    roofline_markdown,
)
from kforcing.evaluation.bench_rounds import interleaved_rows
from kforcing.evaluation.roofline import dtype_of
from kforcing.io.checkpoint import atomic_write_bytes, atomic_write_json
from kforcing.io.hf import to_hf_model
from kforcing.students.feedback import FeedbackStudent

METHODS = ("ar", "kforcing", "kforcing-auto", "lossless", "hf-generate", "hf-assisted")
# measured only when asked for (--methods, or bench --compile): the first run compiles
OPTIONAL = ("ar-compiled", "kforcing-compiled")


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64, 256)
    prompt_len: int = 16
    new_tokens: int = 256
    new_tokens_at: dict[int, int] | None = None   # per batch size overrides (large batches)
    repeats: int = 3
    max_seconds: float | None = None   # per configuration: stop repeating once this is spent
    ks: tuple[int, ...] | None = None  # K-Forcing k values (default 1, 2, 4, 8 up to max_k)
    methods: tuple[str, ...] = METHODS
    temperature: float = 1.0           # ours, lossless and hf-generate's sampling rows
    seed: int = 0
    cache: str | None = None           # autok cache directory
    dtype: str = "fp32"                # weights and activations of every decoder: fp32 | bf16
    layout: str = "auto"               # their weights' memory order (core.device.decode_layout)
    roofline: bool = True              # calibrate the machine; bound and fraction per row
    interleave: bool = False           # methods take turns at each batch size (bench_rounds)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise KForcingError("batch sizes must be positive integers")
        if self.prompt_len < 1 or self.new_tokens < 1 or self.repeats < 1:
            raise KForcingError("prompt length, new tokens and repeats must be >= 1")
        unknown = sorted(set(self.methods) - set(METHODS + OPTIONAL))
        if unknown:
            raise KForcingError(f"unknown bench method(s) {', '.join(unknown)}: choose from "
                                f"{', '.join(METHODS + OPTIONAL)}")
        if not 0 < self.temperature < math.inf:
            raise KForcingError(f"bench temperature must be a finite number > 0 (K-Forcing maps "
                                f"noise to samples), got {self.temperature}")
        if self.new_tokens_at and min(self.new_tokens_at.values()) < 1:
            raise KForcingError("new tokens per batch size must be >= 1")
        decode_layout(self.layout, dtype_of(self.dtype))

    def tokens_at(self, batch_size: int) -> int:
        return (self.new_tokens_at or {}).get(batch_size, self.new_tokens)


@dataclass
class BenchRow:
    method: str
    k: int | None
    batch_size: int
    prompt_len: int
    new_tokens: int                  # per row
    sampling: str                    # greedy | sample
    tokens_per_s: float              # median over repeats, generated tokens across the batch
    step_latency_ms: float | None    # median wall time per forward pass (None: not observable)
    forward_passes: int | None
    repeats: int
    runs_tokens_per_s: list[float]
    machine: dict
    command: str
    extra: dict = field(default_factory=dict)


@dataclass
class Run:
    tokens: int
    passes: int | None
    seconds: float
    extra: dict = field(default_factory=dict)
    rows: int | None = None                 # batch rows (ours: to split off the first tokens)
    decode_seconds: float | None = None     # after the prompt is read (ours only)

    @property
    def decode_rate(self) -> float | None:
        """Tokens/s after the prompt: every token but each row's first, over the time after
        the prefill (the inter-token rate; None where the phases are not observable)."""
        if not self.decode_seconds or self.rows is None or self.tokens <= self.rows:
            return None
        return (self.tokens - self.rows) / self.decode_seconds


@dataclass
class BenchResult:
    rows: list[BenchRow]
    skipped: list[dict]              # {"method", "batch_size", "reason"}
    machine: dict
    command: str
    config: dict
    roofline_md: str | None = None   # the roofline section for docs/RESULTS.md

    def speedups(self) -> dict[str, dict[int, float]]:
        """series label -> {batch size: tokens/s over fp32 `ar` at that batch size (the
        baseline; `ar` of the row's own dtype when fp32 was not measured)}."""
        ar: dict[tuple[str, int], float] = {(r.machine.get("dtype", "fp32"), r.batch_size):
                                            r.tokens_per_s for r in self.rows if r.method == "ar"}
        out: dict[str, dict[int, float]] = {}
        for r in self.rows:
            base = ar.get(("fp32", r.batch_size), ar.get((r.machine.get("dtype"), r.batch_size)))
            if base:
                out.setdefault(series_label(r), {})[r.batch_size] = r.tokens_per_s / base
        return out


def command_line() -> str:
    return "kforcing " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# -- one configuration --------------------------------------------------------------------------

def measure(fn: Callable[[int], Run], new_tokens: int, repeats: int, max_seconds: float | None
            ) -> list[Run]:
    """fn(n) generates n tokens per row and reports a Run: `repeats` timed runs (fewer once
    max_seconds is spent); the caller warms up."""
    runs: list[Run] = []
    t0 = time.perf_counter()
    while len(runs) < repeats:
        runs.append(fn(new_tokens))
        if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
            break
    return runs


def _timed(call: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t


def _ours(fn) -> Callable[[int], Run]:
    def run(n: int) -> Run:
        res, secs = _timed(lambda: fn(n))
        return Run(res.num_tokens, res.forward_passes, secs, dict(res.extra),
                   len(res.tokens), res.decode_seconds)
    return run


def _hf(hf_model, prompts: list[list[int]], **kw) -> Callable[[int], Run]:
    ids = torch.tensor(prompts, dtype=torch.long)

    def run(n: int) -> Run:
        with torch.inference_mode():
            out, secs = _timed(lambda: hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), min_new_tokens=n, max_new_tokens=n,
                pad_token_id=0, **kw))
        new = out.shape[1] - ids.shape[1]
        return Run(new * ids.shape[0], None if "assistant_model" in kw else new, secs)
    return run


def _row(method: str, k: int | None, sampling: str, runs: list[Run], B: int, cfg: BenchConfig,
         machine: dict, command: str, extra: dict | None = None) -> BenchRow:
    new_tokens = cfg.tokens_at(B)
    rates = [r.tokens / r.seconds for r in runs]
    lat = [r.seconds / r.passes * 1e3 for r in runs if r.passes]
    passes = runs[-1].passes
    extra = dict(extra or {})
    decode = [r.decode_rate for r in runs]
    if all(d is not None for d in decode):   # the roofline's share divides this (decode only)
        extra["decode_tokens_per_s"] = round(statistics.median(decode), 2)
    return BenchRow(method, k, B, cfg.prompt_len, new_tokens, sampling,
                    statistics.median(rates), statistics.median(lat) if lat else None, passes,
                    len(runs), [round(x, 2) for x in rates], machine, command, extra)


# -- the benchmark ------------------------------------------------------------------------------

@dataclass
class Bench:
    """What every measured configuration needs: the models, the config and the record."""
    teacher: Transformer
    student: object | None
    draft: Transformer | None
    cfg: BenchConfig
    machine: dict
    command: str
    hf_teacher: object = None
    hf_draft: object = None
    compiled: tuple | None = None        # the compiled graphs of the *-compiled rows
    first_runs: dict = field(default_factory=dict)   # (method, B, k) -> seconds
    usage: dict = field(default_factory=dict)    # the last configuration's load and CPU time

    def measure(self, fn: Callable[[int], Run], B: int, warmup: int = 8) -> list[Run]:
        """A warm-up, then the timed runs, bracketed by the load average and the CPU time they
        got (not the warm-up: a compiled row's warm-up may compile in worker processes, which
        would read as a busy machine)."""
        fn(min(warmup, self.cfg.tokens_at(B)))
        watch = Watch(torch.get_num_threads())
        runs = measure(fn, self.cfg.tokens_at(B), self.cfg.repeats, self.cfg.max_seconds)
        self.usage = watch.stop().record()
        return runs

    def row(self, method: str, k: int | None, sampling: str, runs: list[Run], B: int,
            extra: dict | None = None) -> BenchRow:
        return _row(method, k, sampling, runs, B, self.cfg, {**self.machine, **self.usage},
                    self.command, extra)


def choose_methods(cfg: BenchConfig, student, draft: Transformer | None, teacher: Transformer,
                   skipped: list[dict]) -> tuple[set[str], list[int]]:
    """The methods that can run with these models (the others go to `skipped`) and the fixed
    K-Forcing k values."""
    methods = set(cfg.methods)
    ks: list[int] = []
    students = {"kforcing", "kforcing-compiled", "kforcing-auto", "lossless"}
    if student is None:
        for m in sorted(methods & students):
            skipped.append(_skip(m, "no K-Forcing student given (--student)"))
        methods -= students
    elif "kforcing-compiled" in methods and not isinstance(student, FeedbackStudent):
        skipped.append(_skip("kforcing-compiled", "compiled K-Forcing passes need a "
                             "token-feedback student"))
        methods.discard("kforcing-compiled")
    else:
        max_k = student.config.max_k
        ks = sorted(cfg.ks or [k for k in (1, 2, 4, 8) if k <= max_k])
        if max(ks) > max_k:
            raise KForcingError(f"k={max(ks)} exceeds the student's max_k={max_k}")
    if "hf-assisted" in methods:
        if draft is None:
            skipped.append(_skip("hf-assisted", "no draft model given (--draft)"))
            methods.discard("hf-assisted")
        elif draft.config.vocab_size != teacher.config.vocab_size:
            raise KForcingError(f"draft vocabulary {draft.config.vocab_size} differs from the "
                                f"teacher's {teacher.config.vocab_size}: train it on the same "
                                "corpus")
    return methods, ks


def plan_rows(cfg: BenchConfig, methods: set[str], ks: list[int], skipped: list[dict]
              ) -> list[tuple[int, str, int | None]]:
    """(batch size, method, k) of every row, in the order they are measured; for hf-generate k
    is 0 (greedy) or 1 (sampling)."""
    plan: list[tuple[int, str, int | None]] = []
    for B in cfg.batch_sizes:
        plan += [(B, m, None) for m in ("ar", "ar-compiled") if m in methods]
        plan += [(B, m, k) for m in ("kforcing", "kforcing-compiled") if m in methods
                 for k in ks]
        plan += [(B, m, None) for m in ("kforcing-auto", "lossless") if m in methods]
        plan += [(B, "hf-generate", 0), (B, "hf-generate", 1)] if "hf-generate" in methods else []
        if "hf-assisted" in methods:
            if B == 1:
                plan.append((B, "hf-assisted", None))
            else:
                skipped.append(_skip("hf-assisted", "transformers assisted generation supports "
                                     "batch size 1 only", B))
    return plan


def _skip(method: str, reason: str, B: int | None = None) -> dict:
    return {"method": method, "batch_size": B, "reason": reason}


# -- one row per method: (bench, batch size, k, prompts) -> BenchRow ---------------------------

def _decode_ar(b: Bench, prompts: list[list[int]]) -> Callable[[int], GenerationResult]:
    sampling = SamplingConfig(temperature=b.cfg.temperature)
    # the teacher's compiled graph only when bench_compiled lends it
    return lambda n: generate_ar(b.teacher, prompts, n, sampling=sampling, seed=b.cfg.seed,
                                 stop_at_eos=False)


def _decode_kforcing(b: Bench, prompts: list[list[int]], k: int
                     ) -> Callable[[int], GenerationResult]:
    # `generate` routes every student (PushForward layouts, the token-feedback student)
    return lambda n: generate(b.student, prompts, n, mode="kforcing", k=k,
                              temperature=b.cfg.temperature, seed=b.cfg.seed, stop_at_eos=False)


def ar_row(b: Bench, B: int, k: int | None, prompts: list[list[int]]) -> BenchRow:
    return b.row("ar", 1, "sample", b.measure(_ours(_decode_ar(b, prompts)), B), B)


def kforcing_row(b: Bench, B: int, k: int | None, prompts: list[list[int]]) -> BenchRow:
    return b.row("kforcing", k, "sample",
                 b.measure(_ours(_decode_kforcing(b, prompts, k)), B, warmup=2 * k), B)


def _compiled_row(method: str, decode: Callable) -> Callable[..., BenchRow]:
    """The row of `method` (ar-compiled, kforcing-compiled) decoding through the compiled graphs
    (lent for its runs only, bench_compiled). Its first run of each configuration compiles what
    is new and is recorded as `first_run_seconds`."""
    def row(b: Bench, B: int, k: int | None, prompts: list[list[int]]) -> BenchRow:
        fn = _ours(lend_compiled(b, decode(b, prompts, k)))
        if (method, B, k) not in b.first_runs:   # full length: the timed runs' shapes
            b.first_runs[method, B, k] = round(fn(b.cfg.tokens_at(B)).seconds, 2)
        return b.row(method, k or 1, "sample", b.measure(fn, B, warmup=2 * (k or 4)), B,
                     {"first_run_seconds": b.first_runs[method, B, k]})
    return row


def kforcing_auto_row(b: Bench, B: int, k: int | None, prompts: list[list[int]]) -> BenchRow:
    choice = choose_k(b.student, B, cache=b.cfg.cache)
    fn = _ours(_decode_ar(b, prompts) if choice.k == 1
               else _decode_kforcing(b, prompts, choice.k))
    return b.row("kforcing-auto", choice.k, "sample", b.measure(fn, B, warmup=2 * choice.k), B,
                 {"calibration_tokens_per_s": {str(kk): round(v, 1)
                                               for kk, v in choice.tokens_per_s.items()},
                  "calibrated_batch": choice.bucket, "from_cache": choice.cached,
                  "reason": choice.reason})


def lossless_row(b: Bench, B: int, k: int | None, prompts: list[list[int]]) -> BenchRow:
    # a teacher-preserving student verifies with the teacher it holds
    verifier = None if b.student.teacher is not None else b.teacher
    runs = b.measure(_ours(lambda n: generate(
        b.student, prompts, n, mode="lossless", temperature=b.cfg.temperature, seed=b.cfg.seed,
        stop_at_eos=False, teacher=verifier)), B)
    last = runs[-1].extra
    accepted = [r.extra["accepted_per_pass"] for r in runs if "accepted_per_pass" in r.extra]
    return b.row("lossless", b.student.config.max_k, "sample", runs, B,
                 {"mean_accepted_per_pass": statistics.mean(accepted) if accepted else None,
                  "tokens_per_pass": last.get("tokens_per_pass"),
                  "passes_per_token": last.get("passes_per_token"), "fused": last.get("fused")})


def hf_generate_row(b: Bench, B: int, k: int | None, prompts: list[list[int]]) -> BenchRow:
    kw = ({"do_sample": True, "temperature": b.cfg.temperature, "top_k": 0, "top_p": 1.0} if k
          else {"do_sample": False})
    return b.row("hf-generate", None, "sample" if k else "greedy",
                 b.measure(_hf(b.hf_teacher, prompts, **kw), B), B)


def hf_assisted_row(b: Bench, B: int, k: int | None, prompts: list[list[int]]) -> BenchRow:
    runs = b.measure(_hf(b.hf_teacher, prompts, do_sample=False, assistant_model=b.hf_draft), B)
    return b.row("hf-assisted", None, "greedy", runs, B, {"draft_params": b.draft.num_params()})


ROWS: dict[str, Callable[[Bench, int, int | None, list[list[int]]], BenchRow]] = {
    "ar": ar_row, "kforcing": kforcing_row, "kforcing-auto": kforcing_auto_row,
    "lossless": lossless_row, "hf-generate": hf_generate_row, "hf-assisted": hf_assisted_row,
    "ar-compiled": _compiled_row("ar-compiled", lambda b, prompts, k: _decode_ar(b, prompts)),
    "kforcing-compiled": _compiled_row("kforcing-compiled", _decode_kforcing)}


def run_bench(teacher: Transformer, student=None, *, draft: Transformer | None = None,
              cfg: BenchConfig | None = None, data: str | Path | None = None,
              command: str | None = None, progress: bool = True) -> BenchResult:
    """Measure every configured method at every batch size. `teacher` is the AR model (and what
    the HF peers run); `student` a K-Forcing student of that teacher; `draft` the small model
    for HF assisted generation."""
    cfg = cfg or BenchConfig()
    teacher, student, draft = ready_models(teacher, student, draft, dtype_of(cfg.dtype),
                                           cfg.layout, cfg.prompt_len,
                                           max(cfg.tokens_at(B) for B in cfg.batch_sizes))
    skipped: list[dict] = []
    methods, ks = choose_methods(cfg, student, draft, teacher, skipped)
    machine = {**machine_info(), "dtype": cfg.dtype, "cores_pinned": usable_cores(),
               "weight_layout": layout_of(teacher.output.weight)}
    b = Bench(teacher, student, draft, cfg, machine, command or command_line())
    if methods & {"hf-generate", "hf-assisted"}:
        import transformers  # optional dependency: only the HF peers need it
        b.hf_teacher = to_hf_model(teacher)
        b.machine = {**b.machine, "transformers": transformers.__version__}
    if "hf-assisted" in methods:
        b.hf_draft = to_hf_model(draft.eval())
    prompts_by_b: dict[int, list[list[int]]] = {}

    def prompts_for(B: int) -> list[list[int]]:
        if B not in prompts_by_b:
            prompts_by_b[B] = make_prompts(B, cfg.prompt_len, teacher.config.vocab_size, data,
                                           cfg.seed)
        return prompts_by_b[B]

    plan = plan_rows(cfg, methods, ks, skipped)
    model = student if student is not None else teacher
    before = calibrate_for(model, ks, cfg) if cfg.roofline else None   # and again after
    bar = tqdm(total=len(plan) * (cfg.repeats if cfg.interleave else 1), disable=not progress,
               desc="bench", unit="run" if cfg.interleave else "config", dynamic_ncols=True)

    def on_row(B: int, method: str, k: int | None) -> None:
        bar.set_postfix(batch=B, method=method if k is None else f"{method}:{k}")
        bar.update()

    if cfg.interleave:
        rows = interleaved_rows(b, plan, prompts_for, ROWS, on_row)
    else:
        rows = []
        for B, method, k in plan:
            on_row(B, method, k)
            rows.append(ROWS[method](b, B, k, prompts_for(B)))
    bar.close()
    roof = ({cfg.dtype: add_roofline(rows, model, ks, cfg, [before, calibrate_for(model, ks, cfg)])}
            if cfg.roofline else None)
    conf = {**asdict(cfg), "data": str(data) if data else None, "params": teacher.num_params(),
            "student": None if student is None else asdict(student.config),
            "prompts": "validation text" if data else "random tokens", "roofline": roof,
            "ks": ks}
    md = roofline_markdown(model, ks, [asdict(r) for r in rows], roof) if roof else None
    return BenchResult(rows, skipped, b.machine, b.command, conf, md)


def merge_results(results: list[BenchResult], model) -> BenchResult:
    """One result from runs of the same models in different dtypes (`--dtype fp32,bf16`): the
    rows side by side, one roofline summary per dtype, the section over all of them."""
    first = results[0]
    rows = [r for res in results for r in res.rows]
    roof = {d: s for res in results for d, s in (res.config.get("roofline") or {}).items()}
    config = {**first.config, "dtype": [res.config["dtype"] for res in results],
              "roofline": roof or None}
    md = roofline_markdown(model, first.config["ks"], [asdict(r) for r in rows], roof) \
        if roof else None
    return BenchResult(rows, [s for res in results for s in res.skipped], first.machine,
                       first.command, config, md)


# -- output -------------------------------------------------------------------------------------

def write_results(result: BenchResult, out: str | Path) -> dict[str, Path]:
    """<out>/bench.jsonl, bench_meta.json, bench_tokens_per_s.png, bench_speedup.png."""
    out = Path(out)
    paths = {"jsonl": out / "bench.jsonl", "meta": out / "bench_meta.json",
             **({"roofline_md": out / "roofline.md"} if result.roofline_md else {}),
             "tokens_png": out / "bench_tokens_per_s.png", "speedup_png": out / "bench_speedup.png"}
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in result.rows)
    atomic_write_bytes(paths["jsonl"], lines.encode())
    atomic_write_json(paths["meta"], {
        "command": result.command, "machine": result.machine, "config": result.config,
        "skipped": result.skipped, "busy_warning": busy_warning(result.rows),
        "dtype_winners": dtype_winners([asdict(r) for r in result.rows]),
        "speedup_over_ar": {s: {str(b): round(v, 3) for b, v in d.items()}
                            for s, d in result.speedups().items()}})
    plot(result, paths["tokens_png"], paths["speedup_png"])
    if result.roofline_md:
        atomic_write_bytes(paths["roofline_md"], result.roofline_md.encode())
    return paths


def read_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise KForcingError(f"no benchmark results at {p}")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
