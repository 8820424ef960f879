"""What a draft tree could accept, measured offline on held-out windows (docs/RESULTS.md, "Draft
trees"): for each window, the teacher's own chain g_2..g_k under the same Gumbel noise, and the
rank of g_i among the draft's candidates for position i (scored log q + g, the draft following
the teacher's tokens, as it does along an accepted path). A tree of widths (w_2, ..., w_k)
accepts position i when every rank up to i is below its width, so its tokens per teacher pass
are 1 + the mean length of that prefix. Prints one JSON object (and writes it with --out).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python experiments/tree_probe.py \
        --student runs/smollm2-fb2/k2 --data runs/chat2/568ef6a23fdb --windows 256 \
        --out docs/results/smollm2/trees/probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, gumbel_scores, probs_from_logits, sample
from kforcing.decoding.feedback import _noise, _prefill
from kforcing.io.checkpoint import atomic_write_json
from kforcing.io.tokens import TokenFile
from kforcing.students.feedback import load_feedback
from kforcing.training.feedback import eval_contexts

SHAPES = [(1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 1, 1), (2, 2, 1), (3, 2, 1), (4, 2, 1),
          (4, 2, 2), (8, 2, 1), (4, 3, 2), (8, 4, 2)]


@torch.inference_mode()
def ranks(student, contexts: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(B, k - 1) rank of the teacher's token g_i among the draft's scores at position i."""
    teacher = student.teacher
    B, C = contexts.shape
    s = SamplingConfig(temperature=1.0, coupling="gumbel")
    noise = NoiseStream.from_seed(seed, B)
    pos = torch.arange(C).expand(B, C)
    t_cache = KVCache.for_model(teacher, B, max_len=C + k)
    d_cache = student.new_cache(B, max_len=C + k)
    first, h, _ = _prefill(student, t_cache, d_cache, contexts, torch.ones(B, C, dtype=torch.bool),
                           pos, noise, s)
    G = _noise(noise, torch.arange(1, k + 1).expand(B, k), s, student.vocab_size)
    g = [first]
    for i in range(1, k):
        logits = teacher(g[-1][:, None], input_pos=pos[:, -1:] + i, cache=t_cache)[:, -1]
        g.append(sample(logits, G[:, i - 1], s))
    out = []
    for i in range(1, k):
        if i > 1:   # the draft's step along the teacher's own tokens
            h = student.draft(h[:, None], g[i - 1][:, None], pos[:, -1:] + i - 1,
                              cache=d_cache)[:, 0]
        score = gumbel_scores(probs_from_logits(student.logits(h).float(), s), G[:, i - 1])
        target = score.gather(1, g[i][:, None])
        r = (score > target).sum(1)
        r[torch.isinf(target[:, 0]) | (target[:, 0] < -80)] = 10 ** 9   # outside the draft vocab
        out.append(r)
    return torch.stack(out, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True, help="prepared corpus (its validation split)")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    student = load_feedback(a.student).eval()
    ctx = eval_contexts(TokenFile(Path(a.data) / "validation.bin"), a.windows, 128, seed=a.seed)
    R = torch.cat([ranks(student, ctx[i:i + 32], a.k, a.seed + i)
                   for i in range(0, len(ctx), 32)])
    out = {"student": a.student, "data": a.data, "windows": len(R), "tau": 1.0,
           "in_top": {w: [round(float((R[:, i] < w).float().mean()), 4) for i in range(a.k - 1)]
                      for w in (1, 2, 3, 4, 8)},
           "trees": {}}
    for w in SHAPES:
        if len(w) != a.k - 1:
            continue
        ok = torch.stack([R[:, i] < w[i] for i in range(a.k - 1)], 1).long().cumprod(1)
        nodes, level = 1, 1
        for x in w:
            level *= x
            nodes += level
        out["trees"][",".join(map(str, w))] = {"nodes": nodes,
                                               "tokens_per_pass": round(1 + float(ok.sum(1).float()
                                                                                  .mean()), 4)}
    if a.out:
        atomic_write_json(a.out, out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
