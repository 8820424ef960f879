"""Draft trees against the chain on chat prompts at batch 1 (docs/RESULTS.md, "Draft trees"):
for each prompt, AR and lossless with each tree shape, interleaved in one process on the same
core, the same seed per prompt; tokens/s over all prompts, tokens per teacher pass, and whether
every lossless answer equals AR's. Prints one JSON object (and writes it with --out).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/tree_screen.py \
        --student runs/smollm2-fb2/k1 --trees 1,1,1 2,1,1 4,2,1 --limit 10 --new-tokens 128 \
        --dtype bf16 --out docs/results/smollm2/trees/screen.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from kforcing.core.device import decode_dtype
from kforcing.decoding.generate import generate
from kforcing.evaluation.chat import chat_eos, encode_chat, load_prompts
from kforcing.io.checkpoint import atomic_write_json, tokenizer_path
from kforcing.io.hub import chat_template
from kforcing.io.tokenizers import load_tokenizer
from kforcing.students.feedback import load_feedback
from kforcing.students.store import teacher_dir_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True)
    p.add_argument("--trees", nargs="+", default=["1,1,1", "2,1,1", "4,2,1"],
                   help="tree widths, one shape per argument (1,1,1 is the chain)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    student = load_feedback(a.student)
    student = student.to(decode_dtype(a.dtype, "cpu")).eval()
    tdir = teacher_dir_of(a.student)
    tok, tok_cfg = load_tokenizer(tokenizer_path(tdir)), chat_template(tdir)
    eos = chat_eos(tok, tok_cfg, student.teacher.config.eos_id)
    prompts = load_prompts()[:a.limit]
    ids = [encode_chat(tok, tok_cfg, [{"role": "user", "content": q.prompt}]) for q in prompts]
    methods = ["ar"] + [f"tree {t}" for t in a.trees]
    stats = {m: {"tokens": 0, "seconds": 0.0, "passes": 0} for m in methods}
    tpp: dict[str, list[float]] = {m: [] for m in methods[1:]}
    identical = {m: 0 for m in methods[1:]}
    load_before = os.getloadavg()[0]

    def run(method: str, i: int, n: int):
        if method == "ar":
            return generate(student, [ids[i]], n, mode="ar", seed=i, eos_id=eos)
        return generate(student, [ids[i]], n, mode="lossless", k=a.k, seed=i, eos_id=eos,
                        tree=method.split()[1])

    for m in methods:                                   # warm-up, excluded
        run(m, 0, 8)
    for i in range(len(ids)):
        ar = None
        for m in methods:
            t = time.perf_counter()
            res = run(m, i, a.new_tokens)
            stats[m]["seconds"] += time.perf_counter() - t
            stats[m]["tokens"] += len(res.tokens[0])
            stats[m]["passes"] += res.forward_passes
            if m == "ar":
                ar = res.tokens[0]
            else:
                tpp[m].append(res.extra["tokens_per_pass"])
                identical[m] += res.tokens[0] == ar
    ar_rate = stats["ar"]["tokens"] / stats["ar"]["seconds"]
    out = {"student": a.student, "dtype": a.dtype, "k": a.k, "prompts": len(ids),
           "new_tokens": a.new_tokens, "load_avg_1m_before": load_before,
           "load_avg_1m_after": os.getloadavg()[0], "ar_tokens_per_s": round(ar_rate, 2),
           "trees": {}}
    for m in methods[1:]:
        rate = stats[m]["tokens"] / stats[m]["seconds"]
        out["trees"][m.split()[1]] = {
            "tokens_per_s": round(rate, 2), "vs_ar": round(rate / ar_rate, 3),
            "tokens_per_pass": round(sum(tpp[m]) / len(tpp[m]), 3),
            "identical_to_ar": f"{identical[m]}/{len(ids)}"}
    if a.out:
        atomic_write_json(a.out, out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
