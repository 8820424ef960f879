"""Decode-speed benchmarks (METHOD.md section 7): generated tokens/s across the batch and the
latency of one forward pass, by batch size, for

- `ar`            our KV-cache AR decoding of the teacher (the baseline of every speedup);
- `kforcing`      K-Forcing decoding with a fixed k (1, 2, 4, 8 up to the student's max_k);
- `kforcing-auto` `--k auto` (kforcing.decoding.autok): k chosen per batch size by calibration;
- `lossless`      lossless mode (kforcing.decoding.lossless), exact teacher samples;
- `hf-generate`   transformers `generate` on the same weights exported through kforcing.io.hf,
                  greedy and sampling;
- `hf-assisted`   transformers assisted generation with a small draft model trained on the
                  same corpus (transformers supports it at batch size 1 only).

Every configuration: one short warm-up run (excluded), then up to `repeats` timed runs (fewer
when `max_seconds` is used up; the count is recorded), median reported, EOS ignored so every
run generates exactly `new_tokens` tokens per row. Output: JSON lines, one object per measured
configuration, a meta JSON (machine, command, skipped configurations) and two plots.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kforcing.decoding.autok import choose_k, machine_info
from kforcing.io.checkpoint import atomic_write_bytes, atomic_write_json
from kforcing.errors import KForcingError
from kforcing.decoding.generate import generate_ar, generate_kforcing
from kforcing.decoding.lossless import generate_lossless
from kforcing.core.model import Transformer
from kforcing.core.sampling import SamplingConfig

METHODS = ("ar", "kforcing", "kforcing-auto", "lossless", "hf-generate", "hf-assisted")


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

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise KForcingError("batch sizes must be positive integers")
        if self.prompt_len < 1 or self.new_tokens < 1 or self.repeats < 1:
            raise KForcingError("prompt length, new tokens and repeats must be >= 1")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise KForcingError(f"unknown bench method(s) {', '.join(unknown)}: choose from "
                                f"{', '.join(METHODS)}")
        if self.temperature <= 0:
            raise KForcingError("bench temperature must be > 0 (K-Forcing maps noise to samples)")
        if self.new_tokens_at and min(self.new_tokens_at.values()) < 1:
            raise KForcingError("new tokens per batch size must be >= 1")

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


@dataclass
class BenchResult:
    rows: list[BenchRow]
    skipped: list[dict]              # {"method", "batch_size", "reason"}
    machine: dict
    command: str
    config: dict

    def speedups(self) -> dict[str, dict[int, float]]:
        """series label -> {batch size: tokens/s over `ar` at that batch size}."""
        ar = {r.batch_size: r.tokens_per_s for r in self.rows if r.method == "ar"}
        out: dict[str, dict[int, float]] = {}
        for r in self.rows:
            if r.batch_size in ar:
                out.setdefault(series_label(r), {})[r.batch_size] = r.tokens_per_s / ar[
                    r.batch_size]
        return out


def series_label(r: BenchRow | dict) -> str:
    d = asdict(r) if isinstance(r, BenchRow) else r
    m = d["method"]
    if m == "kforcing":
        return f"kforcing k={d['k']}"
    if m in ("hf-generate", "hf-assisted"):
        return f"{m} ({d['sampling']})"
    return m


def command_line() -> str:
    return "kforcing " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# -- prompts ------------------------------------------------------------------------------------

def make_prompts(batch_size: int, prompt_len: int, vocab: int, data: str | Path | None = None,
                 seed: int = 0) -> list[list[int]]:
    """Held-out text (validation split of a prepared corpus) when given, else random tokens.
    Speed does not depend on content, but lossless and assisted acceptance rates do."""
    g = torch.Generator().manual_seed(seed)
    if data is not None:
        from kforcing.io.data import TokenFile
        tokens = TokenFile(Path(data) / "validation.bin")
        n = tokens.num_blocks(prompt_len)
        if n == 0:
            raise KForcingError(f"validation split of {data} is shorter than one prompt")
        idx = torch.randint(0, n, (batch_size,), generator=g).tolist()
        return [[int(t) for t in tokens.block(i, prompt_len)[:prompt_len]] for i in idx]
    return torch.randint(0, vocab, (batch_size, prompt_len), generator=g).tolist()


# -- one configuration --------------------------------------------------------------------------

def measure(fn: Callable[[int], Run], new_tokens: int, repeats: int, max_seconds: float | None,
            warmup_tokens: int) -> list[Run]:
    """fn(n) generates n tokens per row and reports a Run; warm-up excluded."""
    fn(min(warmup_tokens, new_tokens))
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
        return Run(res.num_tokens, res.forward_passes, secs, dict(res.extra))
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
    return BenchRow(method, k, B, cfg.prompt_len, new_tokens, sampling,
                    statistics.median(rates), statistics.median(lat) if lat else None, passes,
                    len(runs), [round(x, 2) for x in rates], machine, command, extra or {})


def parse_tokens_at(text: str | None, flag: str) -> dict[int, int]:
    """'64=64,256=32' -> {64: 64, 256: 32} (per batch size new-token counts)."""
    if not text:
        return {}
    try:
        return {int(b): int(n) for b, n in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise KForcingError(f"{flag} expects BATCH=TOKENS pairs, e.g. 64=64,256=32") from None


# -- the benchmark ------------------------------------------------------------------------------

def run_bench(teacher: Transformer, student=None, *, draft: Transformer | None = None,
              cfg: BenchConfig | None = None, data: str | Path | None = None,
              command: str | None = None, progress: bool = True) -> BenchResult:
    """Measure every configured method at every batch size. `teacher` is the AR model (and what
    the HF peers run); `student` a K-Forcing student of that teacher; `draft` the small model
    for HF assisted generation."""
    cfg = cfg or BenchConfig()
    command = command or command_line()
    teacher = teacher.eval()
    mcfg = teacher.config
    if student is not None and student.model_config != mcfg:
        raise KForcingError("the student's backbone differs from the teacher's architecture: "
                            "benchmark a student against its own teacher")
    most = max(cfg.tokens_at(B) for B in cfg.batch_sizes)
    need = cfg.prompt_len + most + (2 * student.config.max_k if student else 0)
    if need > mcfg.max_seq_len:
        raise KForcingError(f"prompt {cfg.prompt_len} + {most} new tokens exceed the "
                            f"model's context {mcfg.max_seq_len}")
    machine = machine_info()
    skipped: list[dict] = []

    def skip(method: str, reason: str, B: int | None = None) -> None:
        skipped.append({"method": method, "batch_size": B, "reason": reason})

    methods = set(cfg.methods)
    ks: list[int] = []
    if student is None:
        for m in ("kforcing", "kforcing-auto", "lossless"):
            if m in methods:
                skip(m, "no K-Forcing student given (--student)")
        methods -= {"kforcing", "kforcing-auto", "lossless"}
    else:
        max_k = student.config.max_k
        ks = sorted(cfg.ks or [k for k in (1, 2, 4, 8) if k <= max_k])
        if max(ks) > max_k:
            raise KForcingError(f"k={max(ks)} exceeds the student's max_k={max_k}")
    hf_teacher = hf_draft = None
    if methods & {"hf-generate", "hf-assisted"}:
        from kforcing.io.hf import to_hf_model
        hf_teacher = to_hf_model(teacher)
        import transformers
        machine = {**machine, "transformers": transformers.__version__}
    if "hf-assisted" in methods:
        if draft is None:
            skip("hf-assisted", "no draft model given (--draft)")
            methods.discard("hf-assisted")
        elif draft.config.vocab_size != mcfg.vocab_size:
            raise KForcingError(f"draft vocabulary {draft.config.vocab_size} differs from the "
                                f"teacher's {mcfg.vocab_size}: train it on the same corpus")
        else:
            from kforcing.io.hf import to_hf_model
            hf_draft = to_hf_model(draft.eval())

    sample_cfg = SamplingConfig(temperature=cfg.temperature)
    T, seed = cfg.temperature, cfg.seed
    rows: list[BenchRow] = []
    plan: list[tuple[int, str, int | None]] = []
    for B in cfg.batch_sizes:
        plan += [(B, "ar", None)] if "ar" in methods else []
        plan += [(B, "kforcing", k) for k in ks] if "kforcing" in methods else []
        plan += [(B, m, None) for m in ("kforcing-auto", "lossless") if m in methods]
        plan += [(B, "hf-generate", 0), (B, "hf-generate", 1)] if "hf-generate" in methods else []
        if "hf-assisted" in methods:
            if B == 1:
                plan.append((B, "hf-assisted", None))
            else:
                skip("hf-assisted", "transformers assisted generation supports batch size 1 "
                     "only", B)
    def one(B: int, method: str, k: int | None, prompts: list[list[int]]) -> BenchRow:
        def go(fn, warm=8):
            return measure(fn, cfg.tokens_at(B), cfg.repeats, cfg.max_seconds, warm)

        def row(method_, k_, sampling, runs, extra=None):
            return _row(method_, k_, sampling, runs, B, cfg, machine, command, extra)

        def ar(n):
            return generate_ar(teacher, prompts, n, sampling=sample_cfg, seed=seed,
                               stop_at_eos=False)

        def kf(k_):
            return lambda n: generate_kforcing(student, prompts, n, k=k_, temperature=T,
                                               seed=seed, stop_at_eos=False)

        if method == "ar":
            return row("ar", 1, "sample", go(_ours(ar)))
        if method == "kforcing":
            return row("kforcing", k, "sample", go(_ours(kf(k)), warm=2 * k))
        if method == "kforcing-auto":
            choice = choose_k(student, B, cache=cfg.cache)
            fn = _ours(ar if choice.k == 1 else kf(choice.k))
            return row("kforcing-auto", choice.k, "sample", go(fn, warm=2 * choice.k),
                       {"calibration_tokens_per_s": {str(kk): round(v, 1)
                                                     for kk, v in choice.tokens_per_s.items()},
                        "calibrated_batch": choice.bucket, "from_cache": choice.cached})
        if method == "lossless":
            # a teacher-preserving student verifies with the teacher it holds
            verifier = None if student.teacher is not None else teacher
            runs = go(_ours(lambda n: generate_lossless(
                student, prompts, n, temperature=T, seed=seed, stop_at_eos=False,
                teacher=verifier)))
            last = runs[-1].extra
            return row("lossless", student.config.max_k, "sample", runs,
                       {"mean_accepted_per_pass": statistics.mean(
                           r.extra["accepted_per_pass"] for r in runs),
                        "tokens_per_pass": last.get("tokens_per_pass"),
                        "passes_per_token": last.get("passes_per_token"),
                        "fused": last.get("fused")})
        if method == "hf-generate":
            kw = ({"do_sample": True, "temperature": T, "top_k": 0, "top_p": 1.0} if k
                  else {"do_sample": False})
            return row("hf-generate", None, "sample" if k else "greedy",
                       go(_hf(hf_teacher, prompts, **kw)))
        return row("hf-assisted", None, "greedy",
                   go(_hf(hf_teacher, prompts, do_sample=False, assistant_model=hf_draft)),
                   {"draft_params": draft.num_params()})

    bar = tqdm(plan, disable=not progress, desc="bench", unit="config", dynamic_ncols=True)
    prompts_by_b: dict[int, list[list[int]]] = {}
    for B, method, k in bar:
        bar.set_postfix(batch=B, method=method if k is None else f"{method}:{k}")
        if B not in prompts_by_b:
            prompts_by_b[B] = make_prompts(B, cfg.prompt_len, mcfg.vocab_size, data, seed)
        rows.append(one(B, method, k, prompts_by_b[B]))
    bar.close()
    conf = {**asdict(cfg), "data": str(data) if data else None, "params": teacher.num_params(),
            "student": None if student is None else asdict(student.config),
            "prompts": "validation text" if data else "random tokens"}
    return BenchResult(rows, skipped, machine, command, conf)


# -- output -------------------------------------------------------------------------------------

def write_results(result: BenchResult, out: str | Path) -> dict[str, Path]:
    """<out>/bench.jsonl, bench_meta.json, bench_tokens_per_s.png, bench_speedup.png."""
    out = Path(out)
    paths = {"jsonl": out / "bench.jsonl", "meta": out / "bench_meta.json",
             "tokens_png": out / "bench_tokens_per_s.png", "speedup_png": out / "bench_speedup.png"}
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in result.rows)
    atomic_write_bytes(paths["jsonl"], lines.encode())
    atomic_write_json(paths["meta"], {
        "command": result.command, "machine": result.machine, "config": result.config,
        "skipped": result.skipped,
        "speedup_over_ar": {s: {str(b): round(v, 3) for b, v in d.items()}
                            for s, d in result.speedups().items()}})
    plot(result, paths["tokens_png"], paths["speedup_png"])
    return paths


def plot(result: BenchResult, tokens_png: Path, speedup_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    for r in result.rows:
        series.setdefault(series_label(r), {})[r.batch_size] = r.tokens_per_s
    m = result.machine
    fewer = " (fewer at large batches)" if result.config["new_tokens_at"] else ""
    sub = (f"{result.config['params'] / 1e6:.1f}M params, {result.config['new_tokens']} new "
           f"tokens{fewer}, {m['threads']} thread(s), {m['cpu'][:40]}")
    for path, data, ylabel in ((tokens_png, series, "generated tokens / s (batch total)"),
                               (speedup_png, result.speedups(), "speedup over our AR")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, d in sorted(data.items()):
            bs = sorted(d)
            ax.plot(bs, [d[b] for b in bs], marker="o", label=label,
                    linestyle="--" if label.startswith("hf") else "-")
        ax.set_xscale("log", base=2)
        if path == tokens_png:
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(sub, fontsize=8)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def read_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise KForcingError(f"no benchmark results at {p}")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# -- `kforcing bench` ---------------------------------------------------------------------------

def _ints(s: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise KForcingError(f"{flag} expects comma-separated integers, got '{s}'") from None


def load_models(model: str | None, student: str | None, draft: str | None):
    """(teacher, student, draft): the teacher defaults to the one the student was distilled
    from; with neither, a random `small` model (speed does not depend on the weights)."""
    from kforcing.io.checkpoint import load_model
    kf = teach = None
    if student:
        from kforcing.training.distill import load_student, teacher_of
        kf = load_student(student)
        teach = teacher_of(kf, student) if not model else None
    if model:
        teach = load_model(model)
    if teach is None:
        from kforcing.core.config import ModelConfig
        torch.manual_seed(0)
        teach = Transformer(ModelConfig.preset("small")).eval()
    return teach, kf, load_model(draft) if draft else None


def main(args) -> None:
    """`kforcing bench`: writes <out>/bench.jsonl, bench_meta.json and two PNGs."""
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else METHODS
    ks = None
    if args.k:   # "1,2,4" fixes the K-Forcing rows; "auto" in the list is the kforcing-auto row
        parts = [p.strip() for p in args.k.split(",") if p.strip()]
        ks = _ints(",".join(p for p in parts if p != "auto"), "--k") or None
        if "auto" in parts and "kforcing-auto" not in methods:
            methods += ("kforcing-auto",)
    if args.no_hf:
        methods = tuple(m for m in methods if not m.startswith("hf-"))
    at = parse_tokens_at(args.new_tokens_at, "--new-tokens-at") or None
    cfg = BenchConfig(batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, new_tokens_at=at,
                      repeats=args.repeats, max_seconds=args.max_seconds, ks=ks or None,
                      methods=methods, temperature=args.temperature, seed=args.seed,
                      cache=args.cache)
    teacher, student, draft = load_models(args.model, args.student, args.draft)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(teacher, student, draft=draft, cfg=cfg, data=args.data,
                       progress=not args.quiet)
    result.config.update(model=args.model, student_dir=args.student, draft=args.draft)
    paths = write_results(result, args.out)
    for s in result.skipped:
        b = f" at batch {s['batch_size']}" if s["batch_size"] else ""
        print(f"skipped {s['method']}{b}: {s['reason']}", file=sys.stderr)
    for r in result.rows:
        print(json.dumps({"method": r.method, "k": r.k, "sampling": r.sampling,
                          "batch_size": r.batch_size, "tokens_per_s": round(r.tokens_per_s, 1),
                          "step_latency_ms": None if r.step_latency_ms is None
                          else round(r.step_latency_ms, 2), "repeats": r.repeats}))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
