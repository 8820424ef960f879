"""Does inductor's C++ wrapper pay for a compiled decode graph? Two copies of the same model,
one compiled with `{"freezing": True}` and one with `{"freezing": True, "cpp_wrapper": True}`
(core.device.compile_options), decode in turns for `--rounds` rounds (one thread), so the
VM's drift hits both alike: AR through Transformer.compile_decode (`--model`), or K-Forcing
windows through decoding.feedback_window.compile_window (`--student`, a token-feedback
student). Reports decode tokens/s per copy (median), the rounds the C++ wrapper won, the first
call's seconds (the compile) and whether both copies chose the same tokens. Prints one JSON
line and writes it to `--out`.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/compile_ab.py \
        --student runs/fb/k4 --out docs/results/feedback/compile-ab/window.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kforcing.core.device import decode_weights
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import generate_feedback
from kforcing.decoding.feedback_window import compile_window
from kforcing.decoding.machine import load_avg_1m
from kforcing.evaluation.bench_inputs import make_prompts
from kforcing.io.checkpoint import atomic_write_json, load_model
from kforcing.students.feedback import load_feedback

VARIANTS = {"python wrapper": {"freezing": True},
            "cpp wrapper": {"freezing": True, "cpp_wrapper": True}}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a teacher: time compiled AR decoding")
    src.add_argument("--student", help="a token-feedback student: time compiled windows")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--data", help="a prepared corpus for held-out prompts (default: random)")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    load_before = load_avg_1m()
    models, first_s = {}, {}
    for name, opts in VARIANTS.items():
        # fp32, in the layout every decoding command gives them (core.device.decode_weights)
        if a.student:
            m = decode_weights(load_feedback(a.student), torch.float32)
            compile_window(m, options=opts)
        else:
            m = decode_weights(load_model(a.model), torch.float32).compile_decode(options=opts)
        models[name] = m
    vocab = (models["python wrapper"].vocab_size if a.student
             else models["python wrapper"].config.vocab_size)
    prompts = make_prompts(a.batch_size, a.prompt_len, vocab, a.data)

    def decode(m):
        if a.student:
            return generate_feedback(m, prompts, a.new_tokens, k=a.k, stop_at_eos=False)
        return generate_ar(m, prompts, a.new_tokens, stop_at_eos=False)

    for name, m in models.items():
        t = time.perf_counter()
        decode(m)                                   # compiles
        first_s[name] = round(time.perf_counter() - t, 1)
    rates = {name: [] for name in VARIANTS}
    tokens = {}
    for r in range(a.rounds):
        for name in (list(VARIANTS) if r % 2 else list(VARIANTS)[::-1]):
            res = decode(models[name])
            rates[name].append(a.batch_size * (a.new_tokens - 1) / res.decode_seconds)
            tokens[name] = res.tokens
    med = {n: statistics.median(v) for n, v in rates.items()}
    out = {"what": "K-Forcing windows" if a.student else "AR", "model": a.student or a.model,
           "k": a.k if a.student else None, "batch_size": a.batch_size,
           "new_tokens": a.new_tokens, "rounds": a.rounds, "threads": torch.get_num_threads(),
           "load_avg_1m_before": load_before, "load_avg_1m_after": load_avg_1m(),
           "decode_tokens_per_s": {n: round(v, 1) for n, v in med.items()},
           "cpp_over_python": round(med["cpp wrapper"] / med["python wrapper"], 3),
           "cpp_faster_rounds": sum(c > py for py, c in zip(
               rates["python wrapper"], rates["cpp wrapper"], strict=True)),
           "first_call_seconds": first_s,
           "same_tokens": tokens["cpp wrapper"] == tokens["python wrapper"]}
    print(json.dumps(out))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.out, out)


if __name__ == "__main__":
    main()
