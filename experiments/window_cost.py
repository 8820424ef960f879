"""What one decoding window costs at batch 1: the teacher's pass over T = 1, 2, 4 new tokens
(KV cache of a 200-token context), its output head over those T positions, and the feedback
draft's pieces (a block step, the draft-vocabulary head, the Gumbel noise of k tokens); with
--tree, a draft tree's pass (per query and masked) and proposal next to the chain's.
Every piece is timed once per round, the pieces taking turns, for `--repeats` rounds after a
warm-up (so a drift in the machine's speed hits them alike); medians; one thread; prints one
JSON line.

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


class Pieces:
    """Named pieces to time: `add(name, fn)`, then `run(repeats)` -> {name: median ms}."""

    def __init__(self):
        self.fns: dict = {}

    def add(self, name: str, fn) -> None:
        self.fns[name] = fn

    def run(self, repeats: int) -> dict[str, float]:
        times: dict[str, list[float]] = {name: [] for name in self.fns}
        for fn in self.fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in self.fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        return {name: round(1000 * statistics.median(ts), 3) for name, ts in times.items()}


def tree_costs(student, tree: DraftTree, ctx: torch.Tensor, ms: Pieces) -> None:
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
    ms.add("chain_pass_per_query", chain_pass)
    ms.add(f"tree_{name}_pass_per_query", lambda: tree_pass(True))
    ms.add(f"tree_{name}_pass_masked", lambda: tree_pass(False))
    hn = torch.randn(1, tree.size, feats.shape[-1], dtype=feats.dtype)
    ms.add(f"tree_{name}_head", lambda: teacher.output(hn))
    ms.add("chain_propose", lambda: student.propose(window()))
    ms.add(f"tree_{name}_propose", lambda: student.propose_tree(window(), tree))


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
    out = {"student": a.student, "dtype": a.dtype, "threads": 1, "repeats": a.repeats,
           "load_avg_1m_before": os.getloadavg()[0]}
    ms = Pieces()
    ctx = torch.randint(0, V, (1, 200))
    for T in (1, 2, 4):
        cache = KVCache.for_model(teacher, 1, max_len=256)
        teacher(ctx, cache=cache)
        n = cache.length

        def step(T=T, cache=cache, n=n):
            cache.length = n
            teacher(torch.randint(0, V, (1, T)), cache=cache, return_hidden=True)
        ms.add(f"teacher_pass_T{T}_hidden", step)
        h = torch.randn(1, T, dim, dtype=dtype)
        ms.add(f"teacher_head_T{T}", lambda h=h: teacher.output(h))
    dcache = student.new_cache(1, 256)

    def draft_step():
        dcache.length = 0
        student.draft(torch.randn(1, 1, dim, dtype=dtype), torch.tensor([[5]]),
                      torch.tensor([[10]]), cache=dcache)
    ms.add("draft_block_step", draft_step)
    h = torch.randn(1, dim, dtype=dtype)
    ms.add("draft_head", lambda: student.logits(h))
    noise = NoiseStream.from_seed(0, 1)
    s = SamplingConfig(coupling="gumbel")
    ms.add("gumbel_noise_k4", lambda: token_noise(noise, torch.arange(4)[None], s, V))
    if a.tree:
        tree_costs(student, DraftTree(tuple(int(w) for w in a.tree.split(","))), ctx, ms)
    out["ms"] = ms.run(a.repeats)
    out["load_avg_1m_after"] = os.getloadavg()[0]
    if a.out:
        atomic_write_json(a.out, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
