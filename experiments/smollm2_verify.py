"""SmolLM2-135M-Instruct imported from its GGUF: our backbone vs transformers on the same weights.

Logits (fp32 max abs diff), greedy 64-token continuation, and AR decode speed at batch 1 and 8
(median of 3 timed runs after one warm-up, 64 new tokens, no early stop). Writes JSON.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/smollm2_verify.py \
        --teacher runs/smollm2 --out docs/teachers/smollm2_verify.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.generate import generate_ar
from kforcing.io.checkpoint import load_model
from kforcing.io.hub import chat_template, fetch_smollm2, load_gguf, render_chat
from kforcing.io.tokenizers import load_tokenizer


def timed(fn, repeats: int = 3) -> float:
    fn()                                                   # warm-up, excluded
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="runs/smollm2")
    ap.add_argument("--out", default="docs/teachers/smollm2_verify.json")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    hf, _ = load_gguf(fetch_smollm2())
    ours = load_model(args.teacher)
    tok = load_tokenizer(args.teacher)
    text = render_chat(chat_template(args.teacher),
                       [{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(text, add_special_tokens=False).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    n = args.new_tokens
    greedy = SamplingConfig(temperature=0)
    got = generate_ar(ours, [ids], n, sampling=greedy, stop_at_eos=False).tokens[0]
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    result = {"prompt_tokens": len(ids), "logits_max_abs_diff": diff,
              "greedy_tokens_identical": got == ref, "greedy_new_tokens": n,
              "greedy_text": tok.decode(got, skip_special_tokens=True),
              "threads": torch.get_num_threads(), "speed": {}}
    for batch in (1, 8):
        xb = x.repeat(batch, 1)

        def run_ours(batch=batch):
            generate_ar(ours, [ids] * batch, n, sampling=greedy, stop_at_eos=False)

        def run_hf(xb=xb):
            with torch.no_grad():
                hf.generate(xb, attention_mask=torch.ones_like(xb), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, eos_token_id=None,
                            pad_token_id=0)

        t_ours, t_hf = timed(run_ours), timed(run_hf)
        result["speed"][f"batch{batch}"] = {
            "ours_tokens_per_s": round(batch * n / t_ours, 1),
            "hf_tokens_per_s": round(batch * n / t_hf, 1),
            "ours_s": round(t_ours, 3), "hf_s": round(t_hf, 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
