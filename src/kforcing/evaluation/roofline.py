"""Roofline bounds on decode speed (docs/METHOD.md section 10).

A decode pass reads every weight matrix once (memory time: bytes / bandwidth) and does ~2 FLOPs
per weight per position (compute time: FLOPs / matmul rate); it takes at least the larger of the
two. At batch 1 the weights dominate (memory-bound); the batch size where the arithmetic catches
up is where decoding turns compute-bound, and from there a design that pushes more positions per
emitted token than AR (K-Forcing's noise tokens) cannot beat AR by much.

- `calibrate(dtype)`: this machine's matrix-vector bandwidth and matmul rate, measured;
- `pass_costs(model, k)`: one decoding pass per method as segments (weights read, FLOPs and KV
  bytes per row, tokens emitted per row): AR, each K-Forcing layout, the token-feedback student;
- `bound_tokens_per_s`, `compute_bound_batch`: the bound per batch size and the boundary;
- `roofline_section`: the markdown section for docs/RESULTS.md, with the measured fraction of
  the bound per benchmark row and a GPU estimate from the same model (a datasheet, not measured).

Attention over the cache is counted (KV bytes and score FLOPs at `context` positions); norms,
sampling and Python overhead are not, so a bound is an upper limit, not a prediction.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kforcing.core.device import laid_out
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.students.feedback import FeedbackStudent
from kforcing.students.pushforward import PushForward

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise KForcingError(f"dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next((n for n, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


# -- the machine --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    dtype: str
    matvec_gb_per_s: float        # weight bytes a matrix-vector product streams per second
    matmul_gflop_per_s: float     # a (256 x D) @ (D x 4D) product's FLOP rate
    source: str                   # "measured, N thread(s)" or where an estimate comes from


# NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 dense bf16 TFLOP/s. Real kernels reach perhaps
# 70-85% of both; this is an estimate from the datasheet, never measured here.
GPU_ESTIMATE = Calibration("bf16", 4800.0, 989_000.0, "estimate: NVIDIA H200 datasheet peaks")


def _median_seconds(fn: Callable[[], object], repeats: int, inner: int,
                    timer: Callable[[], float]) -> float:
    fn()                                      # warm-up
    times = []
    for _ in range(repeats):
        t = timer()
        for _ in range(inner):
            fn()
        times.append((timer() - t) / inner)
    return max(statistics.median(times), 1e-12)


def calibrate(dtype: str = "fp32", *, working_set: int | None = None, dim: int = 2048,
              batch: int = 256, repeats: int = 5, inner: int = 4,
              timer: Callable[[], float] = time.perf_counter) -> Calibration:
    """Measure this machine (the current thread count), median of `repeats`:

    - bandwidth: one (1 x D) @ (D x D) product through each of n matrices in turn, n of them
      holding `working_set` bytes (at least one), in both weight layouts (core.device.
      LAYOUTS; the faster one counts, so no layout the decoders could choose beats the bound).
      Pass the model's weight bytes: a model whose weights fit in the last-level cache streams
      them at the cache's rate, a larger one at the memory's (on this project's CPU the L3
      holds 300 MiB, so a single 16 MB matrix measures the cache, not DRAM);
    - the matmul rate: a (batch x D) @ (D x D) product."""
    dt = dtype_of(dtype)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(dim, dim, generator=g).to(dt)
    matrix_bytes = w.numel() * w.element_size()
    n = max(1, -(-(working_set or matrix_bytes) // matrix_bytes))
    ws = [w] + [torch.randn(dim, dim, generator=g).to(dt) for _ in range(n - 1)]
    x1 = torch.randn(1, dim, generator=g).to(dt)
    xb = torch.randn(batch, dim, generator=g).to(dt)

    def stream(layout: str) -> float:
        ms = [laid_out(m, layout) for m in ws]
        return _median_seconds(lambda: [F.linear(x1, m) for m in ms], repeats, inner, timer)
    with torch.inference_mode():
        mv = {layout: stream(layout) for layout in ("out-major", "in-major")}
        mm = _median_seconds(lambda: F.linear(xb, w), repeats, inner, timer)
    rates = {layout: n * matrix_bytes / s / 1e9 for layout, s in mv.items()}
    return Calibration(dtype, max(rates.values()), 2 * batch * dim * dim / mm / 1e9,
                       f"measured, {torch.get_num_threads()} thread(s), "
                       f"{n * matrix_bytes / 1e6:.0f} MB streamed ("
                       + ", ".join(f"{k} {v:.1f} GB/s" for k, v in rates.items()) + ")")


def fastest(cals: list[Calibration]) -> Calibration:
    """One calibration from several of the same dtype: the highest bandwidth and the highest
    matmul rate any of them measured (the strictest bound), their sources joined."""
    if len(cals) == 1:
        return cals[0]
    return Calibration(cals[0].dtype, max(c.matvec_gb_per_s for c in cals),
                       max(c.matmul_gflop_per_s for c in cals),
                       f"the fastest of {len(cals)} calibrations: "
                       + "; ".join(c.source for c in cals))


# -- the model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """One forward over some weights: read once per pass, applied to `positions` per row."""
    weight_params: int
    flops_per_row: float
    kv_params_per_row: int        # cache entries read per row (keys and values)


@dataclass(frozen=True)
class PassCost:
    method: str                   # "ar", "kforcing k=4 (teacher-preserving)", ...
    tokens_per_row: int           # emitted per pass
    segments: tuple[Segment, ...]

    def weight_params(self) -> int:
        return sum(s.weight_params for s in self.segments)

    def seconds(self, batch: int, cal: Calibration) -> float:
        """The bound on one pass: per segment, the larger of memory and compute time."""
        el = torch.empty(0, dtype=dtype_of(cal.dtype)).element_size()
        bw, fl = cal.matvec_gb_per_s * 1e9, cal.matmul_gflop_per_s * 1e9
        return sum(max((s.weight_params + batch * s.kv_params_per_row) * el / bw,
                       batch * s.flops_per_row / fl) for s in self.segments)

    def bound_tokens_per_s(self, batch: int, cal: Calibration) -> float:
        return batch * self.tokens_per_row / self.seconds(batch, cal)


def linear_params(*modules: nn.Module) -> int:
    """Weights of every distinct nn.Linear (a tied head counts once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for lin in m.modules():
            if isinstance(lin, nn.Linear):
                seen[lin.weight.data_ptr()] = lin.weight.numel()
    return sum(seen.values())


def _stack(model: Transformer, positions: int, head_positions: int, context: int) -> Segment:
    """A Transformer over `positions` new positions per row, its head over `head_positions`."""
    c = model.config
    head = c.vocab_size * c.dim
    body = linear_params(model) - head
    hd = c.dim // c.n_head
    attn = 4 * c.n_layer * c.n_head * hd * context          # q.k and p.v per position
    return Segment(body + head, positions * (2 * body + attn) + head_positions * 2 * head,
                   2 * c.n_layer * c.n_kv_head * hd * context)


def pass_costs(model, ks: list[int], context: int = 128) -> list[PassCost]:
    """AR on the model (or the student's teacher) and one pass per k of the student."""
    if isinstance(model, FeedbackStudent):
        teacher = model.teacher
    elif isinstance(model, PushForward):
        teacher = model.context_model
    else:
        teacher = model
    out = [PassCost("ar", 1, (_stack(teacher, 1, 1, context),))]
    for k in ks if model is not teacher else []:
        out.append(_student_cost(model, teacher, k, context))
    return out


def _student_cost(model, teacher: Transformer, k: int, context: int) -> PassCost:
    c = teacher.config
    if isinstance(model, FeedbackStudent):
        # a teacher pass over the k committed tokens, then k - 1 small draft steps
        head = (model.config.draft_vocab_size or c.vocab_size) * c.dim
        draft = linear_params(model.fc, model.layers)
        hd = c.dim // c.n_head
        attn = 4 * model.config.draft_layers * c.n_head * hd * context
        step = Segment(draft + head, 2 * (draft + head) + attn,
                       2 * model.config.draft_layers * c.n_kv_head * hd * context)
        segs = (_stack(teacher, k, 1, context),) + (step,) * (k - 1)
        return PassCost(f"kforcing k={k} (feedback)", k, segs)
    n = model.config.n_noise(k)
    noise = Segment(linear_params(model.noise), 2 * n * linear_params(model.noise), 0)
    if model.teacher is None:      # one stack over the k real and n noise positions
        segs = (_stack(model.backbone, k + n, n + 1, context), noise)
    else:                          # the teacher reads the real tokens, the copy the noise
        segs = (_stack(model.teacher, k, 1, context), _stack(model.backbone, n, n, context),
                noise)
    return PassCost(f"kforcing k={k} ({model.config.layout})", k, segs)


def compute_bound_batch(cost: PassCost, cal: Calibration, limit: int = 1 << 16) -> int | None:
    """The smallest batch size at which every segment is compute-bound (None: not up to limit)."""
    b = 1
    while b <= limit:
        if cost.seconds(b, cal) * (1 - 1e-9) <= _compute_seconds(cost, b, cal):
            return b
        b *= 2
    return None


def _compute_seconds(cost: PassCost, batch: int, cal: Calibration) -> float:
    return batch * sum(s.flops_per_row for s in cost.segments) / (cal.matmul_gflop_per_s * 1e9)


# -- the report section -------------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def roofline_section(model, ks: list[int], calibrations: list[Calibration],
                     batch_sizes: list[int], rows: list[dict] | None = None,
                     context: int = 128, gpu: Calibration | None = GPU_ESTIMATE) -> str:
    """Markdown for docs/RESULTS.md: per dtype, each method's weights, compute-bound batch size
    and bound per batch size; with benchmark rows (bench.jsonl dicts), the measured tokens/s as
    a fraction of the bound of its dtype (a row's machine.dtype, default fp32)."""
    costs = pass_costs(model, ks, context)
    rows = rows or []
    lines = ["## Roofline", "",
             f"Bounds from docs/METHOD.md section 10 at a context of {context} tokens: a pass "
             "takes at least max(weight and KV bytes / bandwidth, FLOPs / matmul rate) per "
             "segment; norms, sampling and Python overhead are not counted.", ""]
    for cal in calibrations + ([gpu] if gpu else []):
        lines += [f"### {cal.dtype}: {cal.matvec_gb_per_s:.1f} GB/s matrix-vector, "
                  f"{cal.matmul_gflop_per_s:.1f} GFLOP/s matmul ({cal.source})", ""]
        head = " | ".join(f"B={b}" for b in batch_sizes)
        lines += [f"| method | weights read per pass (M) | compute-bound from B | {head} |",
                  "|---|---|---|" + "---|" * len(batch_sizes)]
        ar = costs[0]
        for cost in costs:
            cells = []
            for b in batch_sizes:
                bound = cost.bound_tokens_per_s(b, cal)
                cell = f"{bound:.0f} ({bound / ar.bound_tokens_per_s(b, cal):.2f}x)"
                got = _measured(rows, cost, b, cal.dtype)
                if got is not None and cal is not gpu:
                    cell += f", measured {got:.0f} = {100 * got / bound:.0f}%"
                cells.append(cell)
            lines.append(f"| {cost.method} | {cost.weight_params() / 1e6:.1f} | "
                         f"{_fmt(compute_bound_batch(cost, cal))} | {' | '.join(cells)} |")
        lines.append("")
    lines += ["Each cell: the bound on generated tokens/s (its speedup over AR's bound), and "
              "where a benchmark row exists its measured decode-phase tokens/s (after the "
              "prompt is read) as a share of the bound. "
              "Compute-bound from B: the first power-of-two batch at which the arithmetic "
              "outlasts reading the weights and the KV cache ('-': not up to 65536, reading "
              "the KV cache outgrows the arithmetic). The GPU rows are an estimate from the "
              "same model and datasheet peaks, not a measurement.", ""]
    return "\n".join(lines)


def _measured(rows: list[dict], cost: PassCost, batch: int, dtype: str) -> float | None:
    for r in rows:
        if r["batch_size"] != batch or r.get("machine", {}).get("dtype", "fp32") != dtype:
            continue
        if cost.method == "ar" and r["method"] == "ar":
            return decode_rate(r.get("extra", {}), r["tokens_per_s"])
        if r["method"] == "kforcing" and cost.method.startswith(f"kforcing k={r['k']} "):
            return decode_rate(r.get("extra", {}), r["tokens_per_s"])
    return None


def decode_rate(extra: dict, tokens_per_s: float) -> float:
    """What a bench row's share of the bound divides: its decode-phase tokens/s (every token
    after each row's first, over the time after the prompt was read; the bound covers decode
    passes, not the prefill), or its whole-call tokens/s where a row has no phase split."""
    return extra.get("decode_tokens_per_s", tokens_per_s)
