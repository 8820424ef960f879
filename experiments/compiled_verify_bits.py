"""Could lossless verification run through the teacher's compiled graph and stay exact? It would
need a compiled k-token pass to give each of its rows the logits that k compiled one-token steps
give, bit for bit. This compares them from the same cache state: prompts from a prepared corpus,
k = 2 and 4, the given dtype, one thread. Prints one JSON line.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/compiled_verify_bits.py \
        --model runs/fb/k4 --data .cache/prepared/brown-v8192-s0 --dtype bf16
"""

from __future__ import annotations

import argparse
import json

import torch

from kforcing.core.kv_cache import KVCache
from kforcing.decoding.common import prefill
from kforcing.evaluation.bench_inputs import load_models, make_prompts
from kforcing.evaluation.roofline import dtype_of


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a teacher or a student (its teacher is used)")
    p.add_argument("--data", help="prepared corpus for the prompts (default: random tokens)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--prompts", type=int, default=6)
    a = p.parse_args()
    torch.set_num_threads(1)
    teacher, student, _ = load_models(None, a.model, None)
    teacher = (student.teacher if student is not None else teacher).to(dtype_of(a.dtype))
    teacher.compile_decode()
    prompts = make_prompts(a.prompts, 40, teacher.config.vocab_size, a.data)
    equal = rows = 0
    worst = 0.0
    for j, tokens in enumerate(prompts):
        for k in (2, 4):
            caches = [KVCache.for_model(teacher, 1, max_len=128) for _ in range(2)]
            pre = [prefill(teacher, c, [tokens[:30 + j]]) for c in caches][0]
            z = torch.tensor([tokens[30 + j:30 + j + k]])
            pos = pre.next_pos[:, None] + torch.arange(k)
            steps = torch.cat([teacher.compiled_pass(z[:, i:i + 1], pos[:, i:i + 1], caches[0])
                               for i in range(k)], 1)
            window = teacher.compiled_pass(z, pos, caches[1])
            equal += sum(torch.equal(steps[0, i], window[0, i]) for i in range(k))
            rows += k
            worst = max(worst, float((steps - window).abs().max()))
    print(json.dumps({"model": a.model, "dtype": a.dtype, "rows": rows, "bit_equal_rows": equal,
                      "max_abs_logit_difference": worst}))


if __name__ == "__main__":
    main()
