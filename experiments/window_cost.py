"""What one decoding window costs at batch 1: the teacher's pass over T = 1, 2, 4 new tokens
(KV cache of a 200-token context), its output head over those T positions, and the feedback
draft's pieces (a block step, the draft-vocabulary head, the Gumbel noise of k tokens); with
--tree, a draft tree's pass (per query and masked) and proposal next to the chain's.
Median of `--repeats` after a warm-up, one thread; prints one JSON line.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/window_cost.py \
        --student runs/smollm2-fb/k2 --out docs/results/smollm2/window_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, token_noise
from kforcing.core.tree import DraftTree
from kforcing.decoding.feedback import Window
from kforcing.io.checkpoint import atomic_write_json
from kforcing.students.feedback import load_feedback


def timed(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return round(1000 * statistics.median(runs), 3)


def tree_costs(student, tree: DraftTree, ctx: torch.Tensor, ms: dict, repeats: int) -> None:
    """A tree window's parts at batch 1 after the 200-token context, next to the chain's."""
    teacher, V, C = student.teacher, student.vocab_size, ctx.shape[1]
    cache = KVCache.for_model(teacher, 1, max_len=C + 64)
    feats = teacher(ctx, cache=cache, return_hidden=True)
    dcache = student.new_cache(1, C + 64)
    h = student.draft(feats, ctx, torch.arange(C)[None], cache=dcache)[:, -1]
    n, dn = cache.length, dcache.length
    nodes, depth = torch.randint(0, V, (1, tree.size)), torch.tensor(tree.depth)
    s = SamplingConfig(coupling="gumbel")
    G = token_noise(NoiseStream.from_seed(0, 1), torch.arange(len(tree.widths) + 1)[None], s, V)

    def window() -> Window:
        cache.length, dcache.length = n, dn
        return Window(len(tree.widths) + 1, nodes[:, 0], h, torch.tensor([C]), dcache, cache, G, s)

    def tree_pass(per_query: bool) -> None:
        cache.length = n
        teacher(nodes, input_pos=C + depth[None], cache=cache, return_hidden=True,
                per_query=per_query, tree=tree)

    def chain_pass() -> None:
        cache.length = n
        teacher(nodes[:, :tree.levels], input_pos=C + torch.arange(tree.levels)[None], cache=cache,
                return_hidden=True, per_query=True)
    name = ",".join(map(str, tree.widths))
    ms["chain_pass_per_query"] = timed(chain_pass, repeats)
    ms[f"tree_{name}_pass_per_query"] = timed(lambda: tree_pass(True), repeats)
    ms[f"tree_{name}_pass_masked"] = timed(lambda: tree_pass(False), repeats)
    ms[f"tree_{name}_head"] = timed(lambda: teacher.output(torch.randn(1, tree.size,
                                                                       feats.shape[-1],
                                                                       dtype=feats.dtype)),
                                    repeats)
    ms["chain_propose"] = timed(lambda: student.propose(window()), repeats)
    ms[f"tree_{name}_propose"] = timed(lambda: student.propose_tree(window(), tree), repeats)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tree", help="also time a draft tree of these widths (e.g. 4,2,1): its "
                   "teacher pass per query (exact) and masked, and the draft's proposal, against "
                   "the chain's")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    student = load_feedback(a.student)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    student = student.to(dtype)
    teacher = student.teacher
    dim, V = teacher.config.dim, teacher.config.vocab_size
    out = {"student": a.student, "dtype": a.dtype, "threads": 1, "load_avg_1m_before": os.getloadavg()[0],
           "ms": {}}
    ms = out["ms"]
    ctx = torch.randint(0, V, (1, 200))
    for T in (1, 2, 4):
        cache = KVCache.for_model(teacher, 1, max_len=256)
        teacher(ctx, cache=cache)
        n = cache.length

        def step(T=T, cache=cache, n=n):
            cache.length = n
            teacher(torch.randint(0, V, (1, T)), cache=cache, return_hidden=True)
        ms[f"teacher_pass_T{T}_hidden"] = timed(step, a.repeats)
        h = torch.randn(1, T, dim, dtype=dtype)
        ms[f"teacher_head_T{T}"] = timed(lambda h=h: teacher.output(h), a.repeats)
    dcache = student.new_cache(1, 256)

    def draft_step():
        dcache.length = 0
        student.draft(torch.randn(1, 1, dim, dtype=dtype), torch.tensor([[5]]), torch.tensor([[10]]),
                      cache=dcache)
    ms["draft_block_step"] = timed(draft_step, a.repeats)
    h = torch.randn(1, dim, dtype=dtype)
    ms["draft_head"] = timed(lambda: student.logits(h), a.repeats)
    noise = NoiseStream.from_seed(0, 1)
    s = SamplingConfig(coupling="gumbel")
    ms["gumbel_noise_k4"] = timed(lambda: token_noise(noise, torch.arange(4)[None], s, V),
                                  a.repeats)
    if a.tree:
        tree_costs(student, DraftTree(tuple(int(w) for w in a.tree.split(","))), ctx, ms, a.repeats)
    out["load_avg_1m_after"] = os.getloadavg()[0]
    if a.out:
        atomic_write_json(a.out, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
