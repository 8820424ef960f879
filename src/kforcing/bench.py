"""Decode-speed benchmarks: our KV-cache decoder against Hugging Face `generate` on the very same
weights (exported through hf.py). Warm-up excluded, median of repeats, one JSON line, a plot.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kforcing.errors import KForcingError
from kforcing.generate import generate_ar
from kforcing.model import Transformer
from kforcing.sampling import SamplingConfig


@dataclass
class BenchRow:
    engine: str
    batch_size: int
    new_tokens: int
    tokens_per_s: float          # median over repeats, generated tokens across the batch
    runs_tokens_per_s: list[float]


def _prompts(batch_size: int, prompt_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, prompt_len), generator=g)


def time_ours(model: Transformer, prompts: torch.Tensor, new_tokens: int, repeats: int
              ) -> list[float]:
    rows = prompts.tolist()
    greedy = SamplingConfig(temperature=0.0)
    generate_ar(model, rows, min(8, new_tokens), sampling=greedy, stop_at_eos=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = generate_ar(model, rows, new_tokens, sampling=greedy, stop_at_eos=False)
        rates.append(res.num_tokens / (time.perf_counter() - t))
    return rates


def time_hf(hf_model, prompts: torch.Tensor, new_tokens: int, repeats: int) -> list[float]:
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
              pad_token_id=0, attention_mask=torch.ones_like(prompts))
    with torch.inference_mode():
        hf_model.generate(prompts, **{**kw, "min_new_tokens": 8, "max_new_tokens": 8})
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = hf_model.generate(prompts, **kw)
            n = (out.shape[1] - prompts.shape[1]) * prompts.shape[0]
            rates.append(n / (time.perf_counter() - t))
    return rates


def run_ar_vs_hf(model: Transformer, *, batch_sizes=(1, 16), new_tokens: int = 256,
                 repeats: int = 3, prompt_len: int = 16, with_hf: bool = True) -> dict:
    """Greedy decode throughput of our decoder and (optionally) HF generate, same weights."""
    if prompt_len + new_tokens > model.config.max_seq_len:
        raise KForcingError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the model's "
                            f"context {model.config.max_seq_len}")
    model = model.eval()
    hf_model = None
    if with_hf:
        from kforcing.hf import to_hf_model
        hf_model = to_hf_model(model)
    rows: list[BenchRow] = []
    for B in batch_sizes:
        prompts = _prompts(B, prompt_len, model.config.vocab_size)
        r = time_ours(model, prompts, new_tokens, repeats)
        rows.append(BenchRow("kforcing-ar", B, new_tokens, statistics.median(r), r))
        if hf_model is not None:
            r = time_hf(hf_model, prompts, new_tokens, repeats)
            rows.append(BenchRow("hf-generate", B, new_tokens, statistics.median(r), r))
    result = {"bench": "ar_vs_hf", "rows": [asdict(r) for r in rows],
              "params": model.num_params(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    if hf_model is not None:
        import transformers
        result["transformers"] = transformers.__version__
        med = {(r.engine, r.batch_size): r.tokens_per_s for r in rows}
        result["speedup_vs_hf"] = {str(B): med[("kforcing-ar", B)] / med[("hf-generate", B)]
                                   for B in batch_sizes}
    return result


def time_kforcing(student, prompts: torch.Tensor, new_tokens: int, k: int, repeats: int
                  ) -> list[float]:
    from kforcing.generate import generate_kforcing
    rows = prompts.tolist()
    generate_kforcing(student, rows, min(2 * k, new_tokens), k=k, stop_at_eos=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = generate_kforcing(student, rows, new_tokens, k=k, stop_at_eos=False, seed=0)
        rates.append(res.num_tokens / (time.perf_counter() - t))
    return rates


def run_kforcing_vs_ar(student, *, ks=(4,), batch_sizes=(1, 16), new_tokens: int = 256,
                       repeats: int = 3, prompt_len: int = 16) -> dict:
    """Throughput of K-Forcing decoding (each k) against AR decoding of the same backbone."""
    model = student.context_model.eval()
    rows: list[BenchRow] = []
    for B in batch_sizes:
        prompts = _prompts(B, prompt_len, model.config.vocab_size)
        r = time_ours(model, prompts, new_tokens, repeats)
        rows.append(BenchRow("kforcing-ar", B, new_tokens, statistics.median(r), r))
        for k in ks:
            r = time_kforcing(student, prompts, new_tokens, k, repeats)
            rows.append(BenchRow(f"kforcing-k{k}", B, new_tokens, statistics.median(r), r))
    med = {(r.engine, r.batch_size): r.tokens_per_s for r in rows}
    return {"bench": "kforcing_vs_ar", "rows": [asdict(r) for r in rows],
            "params": model.num_params(), "threads": torch.get_num_threads(),
            "layout": student.config.layout, "head": student.config.head,
            "torch": torch.__version__,
            "speedup_vs_ar": {f"k{k}_b{B}": med[(f"kforcing-k{k}", B)] / med[("kforcing-ar", B)]
                              for k in ks for B in batch_sizes}}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    engines = sorted({r["engine"] for r in rows})
    batches = sorted({r["batch_size"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(engines)
    for i, eng in enumerate(engines):
        vals = [next((r["tokens_per_s"] for r in rows
                      if r["engine"] == eng and r["batch_size"] == b), 0) for b in batches]
        xs = [j + i * width for j in range(len(batches))]
        bars = ax.bar(xs, vals, width, label=eng)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(batches))],
                  [f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"greedy decode, {rows[0]['new_tokens']} new tokens, "
                 f"{result['params'] / 1e6:.1f}M params, {result['threads']} threads")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> None:
    """`kforcing bench`: prints one JSON line, writes <out>/<bench>.{json,png}."""
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise KForcingError("--batch-sizes and --k expect comma-separated integers") from None
    out = Path(args.out)
    if args.student:
        from kforcing.distill import load_student
        student = load_student(args.student)
        result = run_kforcing_vs_ar(student, ks=ks, batch_sizes=batch_sizes,
                                    new_tokens=args.new_tokens, repeats=args.repeats)
        result["student"] = args.student
        _write(result, out / "kforcing_vs_ar")
        return
    if args.model:
        from kforcing.checkpoint import load_model
        model = load_model(args.model)
    else:
        from kforcing.config import ModelConfig
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset("small"))
    result = run_ar_vs_hf(model, batch_sizes=batch_sizes, new_tokens=args.new_tokens,
                          repeats=args.repeats, with_hf=not args.no_hf)
    result["model"] = args.model or "random small"
    _write(result, out / "ar_vs_hf")


def _write(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(json.dumps(result))
