"""Measurements of the token-feedback student (issue 11): window match, sample quality, speed,
learning curves. Everything writes JSON (and the curves a PNG) and prints it.

    python experiments/feedback_measure.py match   --student RUN --data D --out m.json
    python experiments/feedback_measure.py quality --student RUN --data D --out q.json
    python experiments/feedback_measure.py speed   --student RUN --out s.json
    python experiments/feedback_measure.py curves  --runs R1 R2 ... --out curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import generate_feedback
from kforcing.evaluation.quality import decode, sample_quality
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import TokenFile
from kforcing.students.feedback import load_feedback, resolve_feedback_dir
from kforcing.training.feedback import eval_contexts, evaluate_feedback


def _dump(obj, out: str | None) -> None:
    text = json.dumps(obj, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)


def _for_k(summary: dict, k: int) -> dict:
    """The k-token window's figures from a longer window's (its first k tokens are the same
    tokens: same noise, same draft steps)."""
    prefix = summary["prefix"][:k]
    return {"windows": summary["windows"], "per_position": summary["per_position"][:k],
            "prefix": prefix, "joint": prefix[-1], "overlap2": summary["overlap2"],
            "tokens_per_pass": round(1 + sum(prefix[1:]), 4)}


def match(a) -> None:
    """Window match on held-out windows (validation split), k=2 and k=4, tau 1 and 0.7."""
    student = load_feedback(a.student)
    ctx = eval_contexts(TokenFile(Path(a.data) / "validation.bin"), a.windows, a.context, a.seed)
    k = student.config.max_k
    coupling = a.coupling or student.config.coupling
    res = evaluate_feedback(student, ctx, k=k, taus=a.taus, seed=a.seed, coupling=coupling)
    out = {"student": str(resolve_feedback_dir(a.student)), "windows": a.windows,
           "context": a.context, "seed": a.seed, "coupling": coupling,
           "y1": "sampled from the teacher", "results": {
               tau: {f"k={kk}": _for_k(s, kk) for kk in (2, 4, 8) if kk <= k}
               for tau, s in res.items()}}
    _dump(out, a.out)


def quality(a) -> None:
    """Free-running samples after held-out prompts, tau 1, same noise per row: the teacher's
    own samples (lossless mode = seeded AR sampling) against K-Forcing k=4 samples."""
    student = load_feedback(a.student)
    teacher = student.teacher
    prompts = eval_contexts(TokenFile(Path(a.data) / "validation.bin"), a.prompts,
                            a.prompt_len, a.seed + 1)
    plist = prompts.tolist()
    s = SamplingConfig(temperature=a.tau, coupling=student.config.coupling)
    out: dict = {"student": str(resolve_feedback_dir(a.student)), "prompts": a.prompts,
                 "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "tau": a.tau}
    tok = load_tokenizer(resolve_feedback_dir(a.student) / "tokenizer.json")
    runs = {"teacher (lossless k=4)": dict(mode="lossless", k=4)}
    for k in a.ks:
        runs[f"kforcing k={k}"] = dict(mode="kforcing", k=k)
    for name, kw in runs.items():
        rows = []
        for i in range(0, len(plist), 16):
            r = generate_feedback(student, plist[i:i + 16], a.new_tokens, sampling=s,
                                  noise=NoiseStream.from_seed(a.seed + i, len(plist[i:i + 16])),
                                  stop_at_eos=False, **kw)
            rows += r.tokens
            if kw["mode"] == "lossless":
                out.setdefault("lossless_tokens_per_pass", []).append(r.extra["tokens_per_pass"])
        samples = torch.tensor(rows)
        q = sample_quality(teacher, prompts, samples)
        q["examples"] = decode(tok, samples[:3])
        out[name] = q
    ar = generate_ar(teacher, plist[:16], a.new_tokens, sampling=s,
                     noise=NoiseStream.from_seed(a.seed, 16), stop_at_eos=False).tokens
    out["lossless_equals_ar"] = ar == generate_feedback(
        student, plist[:16], a.new_tokens, mode="lossless", k=4, sampling=s,
        noise=NoiseStream.from_seed(a.seed, 16), stop_at_eos=False).tokens
    # the draft's cache after each pass: re-read with the teacher's features (the default) or
    # keep its own speculative entries
    plain = [generate_feedback(student, plist[i:i + 16], a.new_tokens, mode="lossless", k=4,
                               sampling=s, stop_at_eos=False, refeed=False,
                               noise=NoiseStream.from_seed(a.seed + i, len(plist[i:i + 16])))
             .extra["tokens_per_pass"] for i in range(0, len(plist), 16)]
    out["lossless_tokens_per_pass_no_refeed"] = round(sum(plain) / len(plain), 4)
    tpp = out.pop("lossless_tokens_per_pass")
    out["lossless_tokens_per_pass"] = round(sum(tpp) / len(tpp), 4)
    base = out["teacher (lossless k=4)"]
    for k in a.ks:
        mine = out[f"kforcing k={k}"]
        mine["gen_ppl_vs_teacher"] = round(mine["gen_ppl_teacher"] / base["gen_ppl_teacher"], 4)
        mine["entropy_vs_teacher"] = round(mine["unigram_entropy"] / base["unigram_entropy"], 4)
    _dump(out, a.out)


def speed(a) -> None:
    """Decode speed, one thread: ms per K-Forcing window and per AR step (decode only, prefill
    excluded), lossless and AR tokens/s, at each batch size. The decoders run interleaved
    (AR, then each feedback mode, repeat after repeat, after one warm-up round) and each keeps
    its fastest repeat: on a shared machine the minimum is the least disturbed figure."""
    student = load_feedback(a.student)
    teacher = student.teacher
    s = SamplingConfig(temperature=1.0, coupling=student.config.coupling)
    out: dict = {"student": str(resolve_feedback_dir(a.student)), "threads":
                 torch.get_num_threads(), "prompt_len": a.prompt_len,
                 "new_tokens": a.new_tokens, "repeats": a.repeats, "statistic": "min",
                 "rows": []}
    g = torch.Generator().manual_seed(0)
    V = teacher.config.vocab_size
    for B in a.batch:
        prompts = torch.randint(1, V, (B, a.prompt_len), generator=g).tolist()
        kw = dict(sampling=s, noise=NoiseStream.from_seed(0, B), stop_at_eos=False)
        runs = {"ar": lambda kw=kw, p=prompts: generate_ar(teacher, p, a.new_tokens, **kw)}
        for k in a.ks:
            for mode in ("kforcing", "lossless"):
                runs[f"{mode}_k{k}"] = (lambda kw=kw, p=prompts, k=k, mode=mode:
                                        generate_feedback(student, p, a.new_tokens, k=k,
                                                          mode=mode, **kw))
        best: dict = {}
        for r in range(a.repeats + 1):
            for name, fn in runs.items():
                res = fn()
                if r and (name not in best or res.decode_seconds < best[name].decode_seconds):
                    best[name] = res
        t_ar = best["ar"].decode_seconds
        row = {"batch": B, "ar_ms_per_step": round(1e3 * t_ar / (best["ar"].forward_passes - 1), 3),
               "ar_tokens_per_s": round(B * a.new_tokens / t_ar, 1)}
        for k in a.ks:
            kf, ll = best[f"kforcing_k{k}"], best[f"lossless_k{k}"]
            row[f"kforcing_k{k}_ms_per_window"] = round(1e3 * kf.decode_seconds
                                                        / kf.extra["windows"], 3)
            row[f"kforcing_k{k}_tokens_per_s"] = round(B * a.new_tokens / kf.decode_seconds, 1)
            row[f"kforcing_k{k}_vs_ar"] = round(t_ar / kf.decode_seconds, 3)
            row[f"lossless_k{k}_tokens_per_s"] = round(B * a.new_tokens / ll.decode_seconds, 1)
            row[f"lossless_k{k}_tokens_per_pass"] = round(ll.extra["tokens_per_pass"], 3)
            row[f"lossless_k{k}_vs_ar"] = round(t_ar / ll.decode_seconds, 3)
        out["rows"].append(row)
    _dump(out, a.out)


def curves(a) -> None:
    """Prefix match per position (and 1 - TV at position 2) against cumulative CPU-minutes of
    every run given, at each validation tau: one PNG, and the points as JSONL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for run in a.runs:
        for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "val" in r:
                points.append({"run": run, "k": r["k"], "cum_cpu_min": r["cum_cpu_min"],
                               "step": r["step"], "val": r["val"]})
    taus = list(points[0]["val"]) if points else []
    fig, axes = plt.subplots(1, len(taus), figsize=(6 * len(taus), 4.2), squeeze=False)
    for ax, tau in zip(axes[0], taus, strict=True):
        x = [p["cum_cpu_min"] for p in points]
        kmax = len(points[0]["val"][tau]["prefix"])
        for i in range(1, kmax):
            ax.plot(x, [p["val"][tau]["prefix"][i] for p in points], marker=".",
                    label=f"prefix match to position {i + 1}" if i > 1 else "position-2 match")
        ax.plot(x, [p["val"][tau]["overlap2"] for p in points], "--", color="black",
                label="1 - TV at position 2 (ceiling)")
        for p, q in zip(points, points[1:], strict=False):
            if q["k"] != p["k"]:
                ax.axvline(q["cum_cpu_min"], color="lightgray", lw=0.8)
        ax.set_title(f"feedback draft, {tau}, {points[0]['val'][tau]['windows']} held-out windows")
        ax.set_xlabel("CPU-minutes (one thread; teacher cache + training)")
        ax.set_ylabel("agreement with the teacher")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    Path(a.out).with_suffix(".jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    print(json.dumps({"png": a.out, "points": len(points)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("match")
    m.add_argument("--windows", type=int, default=1024)
    m.add_argument("--context", type=int, default=128)
    m.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.7])
    m.add_argument("--coupling", help="sample with this coupling instead of the student's")
    q = sub.add_parser("quality")
    q.add_argument("--prompts", type=int, default=64)
    q.add_argument("--prompt-len", type=int, default=32)
    q.add_argument("--new-tokens", type=int, default=128)
    q.add_argument("--tau", type=float, default=1.0)
    q.add_argument("--ks", type=int, nargs="+", default=[4])
    sp = sub.add_parser("speed")
    sp.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    sp.add_argument("--prompt-len", type=int, default=32)
    sp.add_argument("--new-tokens", type=int, default=64)
    sp.add_argument("--repeats", type=int, default=7)
    sp.add_argument("--ks", type=int, nargs="+", default=[4])
    for s in (m, q, sp):
        s.add_argument("--student", required=True)
        s.add_argument("--out")
        s.add_argument("--seed", type=int, default=1234)
        if s is not sp:
            s.add_argument("--data", required=True)
    c = sub.add_parser("curves")
    c.add_argument("--runs", nargs="+", required=True)
    c.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    {"match": match, "quality": quality, "speed": speed, "curves": curves}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
