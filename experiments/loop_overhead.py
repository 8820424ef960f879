"""Where AR decoding spends its time outside the model: ms per token end to end, ms per forward
and the loop's overhead per token (decode time minus the forwards), for generate_ar at each
(model, batch, dtype, coupling). One JSON line per config.

The forwards are timed with hooks on the model (they wrap every decode-step forward), so the
overhead is everything else in the loop: the noise, sampling, the streamer, EOS checks, the
Python around them. `--baseline REV` also times that git revision's generate_ar in the same
process, interleaved run by run (the machine is shared: compare A/B, best of `--repeats`), and
checks that both give the same tokens. `--profile` adds a cProfile table of the loop; `--parts`
times only the per-token noise + sample, on random logits, against the baseline too.
`--feedback DIR` instead splits generate_feedback's windows (decoding/feedback.py) into the
teacher's blocks, its head, the draft's proposals, the draft's re-read and the rest.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python experiments/loop_overhead.py \
        --models runs/teacher-small runs/smollm2 --batch 1 8 --dtype fp32 bf16 --baseline HEAD
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import itertools
import json
import os
import pstats
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import generate_feedback
from kforcing.io.checkpoint import load_model
from kforcing.students.feedback import load_feedback

ROOT = Path(__file__).resolve().parents[1]


def import_baseline(rev: str, into: Path) -> str:
    """Import git revision `rev`'s package as kforcing_base (read from `git archive`, the work
    tree and the index untouched) -> its name."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/kforcing"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    pkg = into / "kforcing_base"
    (into / "src" / "kforcing").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(f.read_text().replace("kforcing.", "kforcing_base."))
    sys.path.insert(0, str(into))
    return "kforcing_base"


class ForwardClock:
    """Hooks that add up the time spent inside model(...) calls."""

    def __init__(self, model: torch.nn.Module):
        self.times: list[float] = []
        model.register_forward_pre_hook(lambda m, a, k: self.times.append(-time.perf_counter()),
                                        with_kwargs=True)
        model.register_forward_hook(self._stop, with_kwargs=True)

    def _stop(self, m, a, k, out) -> None:
        self.times[-1] += time.perf_counter()


def parts_main(a, packages: list[str]) -> None:
    """The loop's per-token work outside the model: token_noise + sample for one token of every
    row, on random logits of each model's vocabulary size, per package, interleaved."""
    mods = {p: (importlib.import_module(f"{p}.core.noise"),
                importlib.import_module(f"{p}.core.sampling")) for p in packages}
    for path in a.models:
        V = load_model(path).config.vocab_size
        for dtype, B, coupling in itertools.product(a.dtype, a.batch, a.coupling):
            logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3
            logits = logits.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
            index = torch.full((B, 1), 5)
            calls, tokens = {}, {}
            for p, (noise, sampling) in mods.items():
                cfg = sampling.SamplingConfig(temperature=a.temperature, top_p=a.top_p,
                                              coupling=coupling)
                stream = noise.NoiseStream.from_seed(0, B)

                def step(sampling=sampling, cfg=cfg, stream=stream, index=index, V=V,
                         logits=logits):
                    g = sampling.token_noise(stream, index, cfg, V)[:, 0]
                    return sampling.sample(logits, g, cfg)
                calls[p], tokens[p] = step, step()
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(10 * a.repeats):
                for p, step in calls.items():
                    t = time.perf_counter()
                    step()
                    best[p] = min(best[p], 1e3 * (time.perf_counter() - t))
            row = {"vocab": V, "dtype": dtype, "batch": B, "coupling": coupling,
                   "temperature": a.temperature, "top_p": a.top_p,
                   "load_avg_1m": round(os.getloadavg()[0], 2),
                   "ms_noise_and_sample": {p: round(v, 3) for p, v in best.items()},
                   "same_tokens": all(torch.equal(t, tokens["kforcing"])
                                      for t in tokens.values())}
            print(json.dumps(row), flush=True)


def one_run(gen, model, clock: ForwardClock, prompts, new_tokens: int, sampling, eos: int):
    """-> (tokens, e2e ms/token, decode ms/token, ms/forward, overhead ms/token)."""
    clock.times.clear()
    streamed = []
    res = gen(model, prompts, new_tokens, sampling=sampling, seed=0, eos_id=eos,
              on_tokens=lambda new: streamed.append(len(new[0])))
    steps = max(len(r) for r in res.tokens)
    decode_fwd = clock.times[1:]                     # the first forward is the prefill
    fwd = sum(decode_fwd)
    return (res.tokens, 1e3 * res.seconds / steps, 1e3 * res.decode_seconds / steps,
            1e3 * fwd / max(len(decode_fwd), 1), 1e3 * (res.decode_seconds - fwd) / steps)


def measure(gens: dict, model, clock: ForwardClock, prompts, a, sampling) -> dict:
    eos = model.config.eos_id
    for gen in gens.values():                                               # warm-up
        gen(model, prompts, 4, sampling=sampling, seed=0, eos_id=eos)
    best: dict[str, list[float]] = {}
    tokens = {}
    for _ in range(a.repeats):
        for name, gen in gens.items():       # interleaved: both see the same load
            tok, *ms = one_run(gen, model, clock, prompts, a.new_tokens, sampling, eos)
            tokens[name] = tok
            best[name] = [min(x, y) for x, y in zip(best.get(name, ms), ms, strict=True)]
    out = {}
    for name, (e2e, dec, fwd, over) in best.items():
        out[name] = {"ms_per_token_e2e": round(e2e, 3), "ms_per_token_decode": round(dec, 3),
                     "ms_per_forward": round(fwd, 3), "overhead_ms_per_token": round(over, 3)}
    if "baseline" in tokens:
        out["same_tokens"] = tokens["baseline"] == tokens["current"]
    return out


def profile_loop(model, prompts, a, sampling) -> str:
    pr = cProfile.Profile()
    pr.enable()
    generate_ar(model, prompts, a.new_tokens, sampling=sampling, seed=0,
                eos_id=model.config.eos_id, on_tokens=lambda new: None)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(
        r"sampling|noise|common|ar\.py|\{method|\{built-in")
    return s.getvalue()


class CallClock:
    """Adds up the time of an object's method calls, made outside any other timed call."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self.depth = 0

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (time.perf_counter() - t)
        return timed


def feedback_windows(student, clock: CallClock, prompts, sampling, a) -> dict:
    """ms per window of each timed part and the rest, best of `--repeats`."""
    def run(n):
        clock.ms.clear()
        return generate_feedback(student, prompts, n, k=a.k, mode=a.mode, sampling=sampling,
                                 seed=0, stop_at_eos=False)
    run(4)
    best: dict[str, float] = {}
    for _ in range(a.repeats):
        res = run(a.new_tokens)
        w = res.extra["windows"]
        # the prefill's teacher and draft calls are in clock.ms too: take a 0-token run's off
        total = dict(clock.ms)
        run(0)
        parts = {n: (total[n] - clock.ms.get(n, 0.0)) / w for n in total}
        parts["window"] = 1e3 * res.decode_seconds / w
        parts["rest"] = parts["window"] - sum(v for n, v in parts.items() if n != "window")
        if parts["window"] < best.get("window", float("inf")):     # the fastest run's split
            best = parts
    out = {"k": res.extra["k"], "tokens_per_pass": round(res.extra["tokens_per_pass"], 3),
           "ms_per_window": {n: round(v, 3) for n, v in best.items()}}
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        run(a.new_tokens)
        pr.disable()
        text = io.StringIO()
        pstats.Stats(pr, stream=text).sort_stats("cumtime").print_stats(
            r"decoding|sampling|noise|kv_cache|students/feedback|\{method|\{built-in", 40)
        out["profile"] = text.getvalue()
    return out


def feedback_main(a) -> None:
    """Per window of generate_feedback: the model parts (timed by wrapping them on the instance)
    and the rest of the loop."""
    for dtype in a.dtype:
        student = load_feedback(a.feedback).to(torch.bfloat16 if dtype == "bf16" else
                                               torch.float32)
        teacher, clock = student.teacher, CallClock()
        # instance attributes shadow the methods (nn.Module.__call__ looks forward up per call)
        teacher.forward = clock.wrap("teacher_blocks", teacher.forward)
        teacher.output.forward = clock.wrap("teacher_head", teacher.output.forward)
        student.propose = clock.wrap("draft_propose", student.propose)
        student.draft = clock.wrap("draft_reread", student.draft)
        for B in a.batch:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, teacher.config.vocab_size, (B, a.prompt_len),
                                    generator=g).tolist()
            for coupling in a.coupling:
                sampling = SamplingConfig(temperature=a.temperature, coupling=coupling)
                row = {"feedback": a.feedback, "dtype": dtype, "batch": B, "coupling": coupling,
                       "mode": a.mode, "new_tokens": a.new_tokens, "repeats": a.repeats,
                       "threads": 1, "load_avg_1m": round(os.getloadavg()[0], 2),
                       **feedback_windows(student, clock, prompts, sampling, a)}
                profile = row.pop("profile", None)
                print(json.dumps(row), flush=True)
                if profile:
                    print(profile, flush=True)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["runs/teacher-small", "runs/smollm2"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--coupling", nargs="+", default=["inverse-cdf", "gumbel"])
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", help="a git revision to compare with (e.g. HEAD)")
    p.add_argument("--profile", action="store_true", help="print a cProfile table per config")
    p.add_argument("--parts", action="store_true",
                   help="time only the per-token noise + sample on random logits")
    p.add_argument("--feedback", help="a feedback student's directory: time its decode loop")
    p.add_argument("--k", type=int, default=None, help="with --feedback: tokens per window")
    p.add_argument("--mode", default="lossless", help="with --feedback: kforcing | lossless")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.feedback:
        return feedback_main(a)
    with tempfile.TemporaryDirectory() as tmp:
        gens = {"current": generate_ar}
        if a.baseline:
            base = import_baseline(a.baseline, Path(tmp))
            gens = {"baseline": importlib.import_module(f"{base}.decoding.ar").generate_ar,
                    **gens}
        if a.parts:
            return parts_main(a, ["kforcing"] + (["kforcing_base"] if a.baseline else []))
        for path in a.models:
            for dtype in a.dtype:
                model = load_model(path, dtype=torch.bfloat16 if dtype == "bf16" else
                                   torch.float32)
                clock = ForwardClock(model)
                for B in a.batch:
                    g = torch.Generator().manual_seed(B)
                    prompts = torch.randint(0, model.config.vocab_size, (B, a.prompt_len),
                                            generator=g).tolist()
                    for coupling in a.coupling:
                        sampling = SamplingConfig(temperature=a.temperature, top_p=a.top_p,
                                                  coupling=coupling)
                        row = {"model": path, "dtype": dtype, "batch": B, "coupling": coupling,
                               "temperature": a.temperature, "top_p": a.top_p,
                               "new_tokens": a.new_tokens, "prompt_len": a.prompt_len,
                               "repeats": a.repeats, "threads": 1,
                               "load_avg_1m": round(os.getloadavg()[0], 2),
                               **measure(gens, model, clock, prompts, a, sampling)}
                        print(json.dumps(row), flush=True)
                        if a.profile:
                            print(profile_loop(model, prompts, a, sampling), flush=True)


if __name__ == "__main__":
    main()
