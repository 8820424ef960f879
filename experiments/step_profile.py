"""Where one AR decode step's time goes: torch.profiler over `--steps` single-token steps of a
model at a `--context`-token context (batch 1, one thread), split into the matrix products
(aten::mm) and everything else. Prints one JSON line.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/step_profile.py --model runs/smollm2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kforcing.core.kv_cache import KVCache
from kforcing.io.checkpoint import load_model


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(a.model).eval()
    model = model.to(torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    V = model.config.vocab_size
    cache = KVCache.for_model(model, 1, max_len=a.context + 8)
    model(torch.randint(0, V, (1, a.context)), cache=cache)
    n = cache.length

    def step() -> None:
        cache.length = n
        model(torch.randint(0, V, (1, 1)), input_pos=torch.tensor([[n]]), cache=cache)

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    wall = (time.perf_counter() - t) / a.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    ev = prof.key_averages()
    per = lambda x: round(x / a.steps, 3)   # noqa: E731
    print(json.dumps({
        "model": a.model, "dtype": a.dtype, "context": a.context,
        "step_ms_unprofiled": round(1000 * wall, 3),
        "mm_ms": per(sum(e.self_cpu_time_total for e in ev if e.key == "aten::mm") / 1000),
        "all_ops_self_ms": per(sum(e.self_cpu_time_total for e in ev) / 1000),
        "mm_calls": per(sum(e.count for e in ev if e.key == "aten::mm")),
        "op_calls": per(sum(e.count for e in ev))}))


if __name__ == "__main__":
    main()
