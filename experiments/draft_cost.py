"""What a token-feedback draft step costs, against one AR step of its teacher (docs/METHOD.md
section 9): FeedbackStudent.propose (k-1 draft steps: block, head, Gumbel sampling) next to a
reference propose built from the general draft() path, a whole lossless window
(generate_feedback decode time per window) and AR decoding (generate_ar decode time per token).

Variants are timed interleaved in one process (the machine is shared): every round times each
variant once; min and median over rounds of this thread's CPU time (less disturbed by other
processes than wall time; draft_step_over_ar and window_over_ar are ratios of medians).
Rows are prompts from a prepared token file (or random ids), ragged at batch > 1; the draft
cache is marked as padded, as it is after the first rejection of a lossless decode. Prints
one JSON line.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python experiments/draft_cost.py \
        --student runs/fb/k4 --data .cache/prepared/brown-v8192-s0 --batch 1 16
    ... --compile      # also the compiled draft step (FeedbackStudent.compile_draft)
    ... --profile      # torch.profiler table of propose at the first batch size (stderr)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, sample
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.common import left_pad
from kforcing.decoding.feedback import Window, _noise, _prefill, generate_feedback
from kforcing.io.tokens import TokenFile
from kforcing.students.feedback import FeedbackStudent, load_feedback


def prompts_for(data: str | None, vocab: int, B: int, length: int, seed: int) -> list[list[int]]:
    """B prompts of about `length` tokens (ragged by up to 16 tokens at B > 1)."""
    rng = np.random.default_rng(seed)
    lens = [length - (int(rng.integers(0, 17)) if B > 1 else 0) for _ in range(B)]
    if data is None:
        return [rng.integers(0, vocab, n).tolist() for n in lens]
    toks = TokenFile(Path(data) / "validation.bin").tokens
    starts = rng.integers(0, len(toks) - length - 1, B)
    return [toks[s:s + n].astype(np.int64).tolist() for s, n in zip(starts, lens, strict=True)]


class Setup:
    """A decode state after the prefill: a Window whose draft cache the timed calls roll back."""

    def __init__(self, student: FeedbackStudent, prompts: list[list[int]], k: int,
                 sampling: SamplingConfig):
        teacher = student.teacher
        B = len(prompts)
        ids, valid, pos = left_pad(prompts, "cpu")
        cap = ids.shape[1] + 4 * k
        self.t_cache = KVCache.for_model(teacher, B, max_len=cap)
        self.d_cache = student.new_cache(B, max_len=cap)
        noise = NoiseStream.from_seed(0, B)
        first, h, logits = _prefill(student, self.t_cache, self.d_cache, ids, valid, pos, noise,
                                    sampling)
        self.d_cache.has_padding = True      # as after the first rejected proposal
        self.spec, self.t_len = self.d_cache.length, self.t_cache.length
        G = _noise(noise, torch.arange(1, k + 1)[None].expand(B, k), sampling,
                   teacher.config.vocab_size)
        self.window = Window(k, first, h, pos[:, -1] + 1, self.d_cache, self.t_cache, G,
                             sampling)
        self.first, self.sampling, self.G1 = first, sampling, G[:, 0]

    def propose(self, fn) -> torch.Tensor:
        self.d_cache.truncate(self.spec)
        self.d_cache.has_padding = True
        return fn(self.window)

    def ar_step(self, teacher) -> torch.Tensor:
        """One AR step: a T=1 teacher pass, its head and the sample."""
        self.t_cache.truncate(self.t_len)
        logits = teacher(self.first[:, None], input_pos=self.window.pos[:, None],
                         cache=self.t_cache)[:, -1]
        return sample(logits, self.G1, self.sampling)


def interleaved(fns: dict, rounds: int) -> dict:
    """ms per call, min and median over `rounds` rounds, each round calling every fn once: "cpu"
    counts this thread's CPU time (robust to other processes taking the core), "wall" the
    elapsed time."""
    for fn in fns.values():
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c, t = time.thread_time(), time.perf_counter()
            fn()
            wall[name].append(1000 * (time.perf_counter() - t))
            cpu[name].append(1000 * (time.thread_time() - c))
    return {name: {"cpu_min": round(min(cpu[name]), 4),
                   "cpu_median": round(statistics.median(cpu[name]), 4),
                   "wall_min": round(min(wall[name]), 4)} for name in fns}


def cpu_ms(fn) -> float:
    c = time.thread_time()
    fn()
    return 1000 * (time.thread_time() - c)


def decode_costs(teacher, prompts, k: int, n_new: int, sampling, variants: dict,
                 rounds: int) -> dict:
    """CPU ms per AR token and per lossless window, decode phase only (a whole call's CPU time
    less that of a prefill-only call), interleaved like above. variants: name -> (student,
    propose function patched in for the call)."""
    windows: dict[str, int] = {}
    tpp: dict[str, float] = {}

    def ar(n):
        return lambda: generate_ar(teacher, prompts, n, sampling=sampling, stop_at_eos=False)

    def fb(name, n):
        def run():
            student, FeedbackStudent.propose = variants[name]
            res = generate_feedback(student, prompts, n, k=k, mode="lossless", sampling=sampling,
                                    stop_at_eos=False)
            if n:
                windows[name] = res.extra["windows"]
                tpp[name] = round(res.extra["tokens_per_pass"], 3)
        return run

    out: dict[str, list[float]] = {"ar_token": []}
    out.update({f"window_{name}": [] for name in variants})
    for r in range(rounds + 1):
        ar_ms = cpu_ms(ar(n_new)) - cpu_ms(ar(0))
        per = {name: cpu_ms(fb(name, n_new)) - cpu_ms(fb(name, 0)) for name in variants}
        if r:   # round 0 warms up
            out["ar_token"].append(ar_ms / n_new)
            for name, v in per.items():
                out[f"window_{name}"].append(v / windows[name])
    summary = {name: {"cpu_min": round(min(v), 4), "cpu_median": round(statistics.median(v), 4)}
               for name, v in out.items()}
    return {"ms": summary, "tokens_per_pass": tpp, "windows": windows}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True)
    p.add_argument("--data", help="a prepared corpus folder (validation.bin); default random ids")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--decode-tokens", type=int, default=48,
                   help="new tokens per end-to-end decode (0: skip the decode timings)")
    p.add_argument("--decode-rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time compile_draft()")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    student = load_feedback(a.student)
    teacher = student.teacher
    sampling = SamplingConfig(coupling="gumbel")
    fast = FeedbackStudent.propose
    variants = {"reference": (student, FeedbackStudent.propose_stepwise), "fast": (student, fast)}
    out = {"student": a.student, "k": a.k, "context": a.context, "threads": 1,
           "load_avg_1m_before": os.getloadavg()[0], "batches": {}}
    compiled = None
    if a.compile:
        compiled = load_feedback(a.student, teacher=teacher).compile_draft()
        variants["compiled"] = (compiled, fast)
    for B in a.batch:
        prompts = prompts_for(a.data, teacher.config.vocab_size, B, a.context, seed=B)
        s = Setup(student, prompts, a.k, sampling)
        ref = s.propose(lambda w: student.propose_stepwise(w))
        ref_q = s.window.q_logits
        got = s.propose(student.propose)
        row: dict = {"identical": bool(torch.equal(ref, got)
                                       and torch.equal(ref_q, s.window.q_logits))}
        fns = {"ar_step": lambda s=s: s.ar_step(teacher),
               "propose_reference": lambda s=s: s.propose(lambda w: student.propose_stepwise(w)),
               "propose_fast": lambda s=s: s.propose(student.propose)}
        if compiled is not None:
            c = Setup(compiled, prompts, a.k, sampling)
            t = time.perf_counter()
            cq = c.propose(compiled.propose)
            row["compile_s"] = round(time.perf_counter() - t, 2)
            row["compiled_same_tokens"] = bool(torch.equal(cq, ref))
            finite = ref_q.isfinite()       # -inf outside a draft vocabulary
            row["compiled_same_inf"] = bool(torch.equal(finite, c.window.q_logits.isfinite()))
            row["compiled_max_abs_q"] = float((c.window.q_logits - ref_q)[finite].abs().max())
            fns["propose_compiled"] = lambda c=c: c.propose(compiled.propose)
        row["ms"] = interleaved(fns, a.rounds)
        ms = row["ms"]
        steps = a.k - 1
        row["draft_step_over_ar"] = {
            name: round(ms[f"propose_{name}"]["cpu_median"] / steps / ms["ar_step"]["cpu_median"],
                        3)
            for name in ("reference", "fast", "compiled") if f"propose_{name}" in ms}
        if a.profile and a.batch[0] == B:
            with torch.profiler.profile() as prof:
                for _ in range(20):
                    s.propose(student.propose)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30),
                  file=sys.stderr)
        if a.decode_tokens:
            dv = dict(variants)
            row["decode"] = decode_costs(teacher, prompts, a.k, a.decode_tokens, sampling, dv,
                                         a.decode_rounds)
            FeedbackStudent.propose = fast
            d = row["decode"]["ms"]
            row["window_over_ar"] = {
                name: round(d[f"window_{name}"]["cpu_median"] / d["ar_token"]["cpu_median"], 3)
                for name in dv}
        out["batches"][str(B)] = row
    out["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
