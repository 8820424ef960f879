"""Does the weight layout change decode speed? One model loaded twice, its linear weights
out-major (torch's own) in one copy and in-major (core.device.arrange_weights) in the other;
the copies take turns for `--rounds` rounds (batch 1, one thread), so the VM's drift hits both
alike. Measures, per layout:

- `stream`: one (1 x in) product through each of the model's linear weights, the way a decode
  step reads them (GB/s of weights);
- `eager` (and `compiled` with `--compile`): AR decode tokens/s of `--new-tokens` tokens after a
  `--prompt-len`-token prompt (GenerationResult.decode_seconds), and whether both layouts chose
  the same tokens.

Prints one JSON line and writes it to `--out`.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/layout_ab.py --model runs/smollm2 \
        --compile --out docs/results/smollm2/layout/ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kforcing.core.device import arrange_weights
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.machine import load_avg_1m
from kforcing.evaluation.roofline import dtype_of
from kforcing.io.checkpoint import atomic_write_json, load_model

LAYOUTS = ("out-major", "in-major")


def stream_seconds(model: nn.Module) -> tuple[float, int]:
    ws = list({id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
              .values())
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in ws}
    t = time.perf_counter()
    for w in ws:
        F.linear(xs[w.shape[1]], w)
    return time.perf_counter() - t, sum(w.numel() * w.element_size() for w in ws)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    load_before = load_avg_1m()
    models = {lay: arrange_weights(load_model(a.model, dtype=dtype_of(a.dtype)), lay)
              for lay in LAYOUTS}
    V = models["out-major"].config.vocab_size
    prompt = [torch.randint(0, V, (a.prompt_len,), generator=torch.Generator().manual_seed(0))
              .tolist()]
    kinds = ["stream", "eager"] + (["compiled"] if a.compile else [])
    compile_s = {}
    if a.compile:
        for lay, m in models.items():
            t = time.perf_counter()
            generate_ar(m.compile_decode(), prompt, 4, stop_at_eos=False)     # compiles
            compile_s[lay] = round(time.perf_counter() - t, 1)
    rates = {(k, lay): [] for k in kinds for lay in LAYOUTS}
    tokens = {}
    for r in range(a.rounds + 1):                    # round 0 warms up and is not counted
        order = LAYOUTS if r % 2 else LAYOUTS[::-1]
        for kind in kinds:
            for lay in order:
                m = models[lay]
                if kind == "stream":
                    s, nbytes = stream_seconds(m)
                    rate = nbytes / s / 1e9
                else:
                    res = generate_ar(m, prompt, a.new_tokens, stop_at_eos=False,
                                      compiled=kind == "compiled")
                    rate = (a.new_tokens - 1) / res.decode_seconds
                    tokens[(kind, lay)] = res.tokens
                if r:
                    rates[(kind, lay)].append(rate)
    out = {"model": a.model, "dtype": a.dtype, "rounds": a.rounds, "prompt_len": a.prompt_len,
           "new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
           "load_avg_1m_before": load_before, "load_avg_1m_after": load_avg_1m(),
           "compile_seconds": compile_s, "units": {"stream": "GB/s", "eager": "tokens/s",
                                                   "compiled": "tokens/s"}}
    for kind in kinds:
        med = {lay: statistics.median(rates[(kind, lay)]) for lay in LAYOUTS}
        out[kind] = {**{lay: round(v, 2) for lay, v in med.items()},
                     "in_over_out": round(med["in-major"] / med["out-major"], 3),
                     "in_faster_rounds": sum(i > o for i, o in zip(
                         rates[(kind, "in-major")], rates[(kind, "out-major")], strict=True))}
        if kind != "stream":
            out[kind]["same_tokens"] = tokens[(kind, "in-major")] == tokens[(kind, "out-major")]
    print(json.dumps(out))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.out, out)


if __name__ == "__main__":
    main()
