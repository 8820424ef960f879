"""Where a whole `generate` call's time goes: torch.profiler over one call (after two warm-up
calls, which also compile with --compile), at one batch size (default 1) on one thread, split
into the matrix products (aten::mm, aten::addmm) and everything else, with the heaviest
operators. Prints one JSON line.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/generate_profile.py \
        --model runs/fb/k4 --mode kforcing --k 4 --compile
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from kforcing.decoding.generate import compile_decoders, generate
from kforcing.evaluation.bench_inputs import load_models, make_prompts

MATMULS = ("aten::mm", "aten::addmm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a teacher or a token-feedback student")
    p.add_argument("--mode", choices=("ar", "kforcing", "lossless"), default="kforcing")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--data", help="prepared corpus for the prompt (default: random tokens)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    teacher, student, _ = load_models(None, a.model, None)
    model = student if student is not None else teacher
    if a.compile:
        compile_decoders(model, teacher)
    prompts = make_prompts(a.batch_size, a.prompt_len, teacher.config.vocab_size, a.data)
    kw = {"mode": a.mode, "seed": 0, "stop_at_eos": False}
    if a.mode != "ar":
        kw["k"] = a.k
    for _ in range(2):
        generate(model, prompts, a.new_tokens, **kw)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = generate(model, prompts, a.new_tokens, **kw)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) / 1e3
    mm = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS) / 1e3
    print(json.dumps({
        "model": a.model, "mode": a.mode, "k": a.k, "compile": a.compile,
        "batch_size": a.batch_size,
        "new_tokens": res.num_tokens, "forward_passes": res.forward_passes,
        "profiled_ms": round(total, 1), "matmul_ms": round(mm, 1),
        "matmul_share": round(mm / total, 3),
        "top": [{"op": e.key, "ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count}
                for e in ops[:8]]}))


if __name__ == "__main__":
    main()
