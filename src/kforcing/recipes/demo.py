"""`kforcing demo`: a real instruct model made faster without changing its answers, in about ten
minutes on a CPU.

SmolLM2-135M-Instruct (from PyPI) -> the teacher writes its own chat conversations -> a teacher
cache -> a one-block token-feedback draft trained for a few CPU-minutes (docs/METHOD.md
section 9) -> chat prompts answered side by side by the teacher (AR), lossless mode (the draft
proposes, the teacher verifies: the same answer) and K-Forcing mode (k tokens per pass), with
tokens/s and tokens per teacher pass.

Every step is cached and reused: a second run only prints the comparison again, and a student
given with --student (e.g. the full recipe's, docs/TEACHERS.md) replaces the demo's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kforcing.core.config import load_json
from kforcing.core.device import decode_dtype, decode_weights
from kforcing.errors import KForcingError
from kforcing.evaluation.chat import ChatEvalConfig, chat_eval, load_prompts
from kforcing.evaluation.roofline import dtype_name
from kforcing.io.cache import cache_dir
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    atomic_write_json,
    load_model,
    load_model_config,
    resolve_model_dir,
)
from kforcing.io.hub import TOKENIZER_CONFIG, chat_template, fetch_smollm2, import_teacher
from kforcing.io.tokenizers import load_tokenizer
from kforcing.recipes.feedback import CacheOptions, run_feedback_stage
from kforcing.students.feedback import FeedbackConfig
from kforcing.students.store import load_student, student_info
from kforcing.training.chatdata import chat_corpus
from kforcing.training.feedback import FeedbackTrainConfig

# the chat evaluation set's prompts the demo answers (evaluation/data/chat_prompts.jsonl)
DEMO_PROMPTS = ("capital-france", "rain-story", "study-tips")


# a student the full recipe (docs/TEACHERS.md) trained, used when present, best first
RECIPE_STUDENTS = ("runs/smollm2-fb2/k1", "runs/smollm2-fb2/k2", "runs/smollm2-fb/k2",
                   "runs/smollm2-fb/k1")


def run_demo(*, out: str = "runs/demo", cache: str | None = None, minutes: float = 4.0,
             conversations: int = 192, teacher: str | None = None, student: str | None = None,
             new_tokens: int = 128, k: int = 4, dtype: str = "auto") -> dict:
    """Run (or resume) the demo; returns its summary (also written to <out>/demo.json).
    teacher: an imported instruct model directory to use instead of SmolLM2. student: a
    feedback student to compare instead of training the demo's own (default: the full
    recipe's, when runs/smollm2-fb holds one). dtype: of the comparison (core.device.
    decode_dtype; auto = bf16 where the hardware has native bf16 matmuls)."""
    dt = decode_dtype(dtype)
    # the paths the user named are checked before anything is downloaded or trained
    if teacher:
        teacher_dir = resolve_model_dir(teacher)
        load_model_config(teacher_dir)
        if chat_template(teacher_dir) is None:
            raise KForcingError(f"{teacher_dir} has no chat template: the demo needs an "
                                "instruct teacher (`kforcing import` one)")
    if student:
        student_info(student)
    out_dir = Path(out)
    found = Path(student) if student else None
    if found is None and not teacher:
        found = next((Path(d) for d in RECIPE_STUDENTS if _trained(d)), None)
    if found is not None:
        print(f"[1-4/5] student: using {found}")
        student_dir = found
    else:
        if teacher:
            print(f"[1/5] teacher: {teacher_dir}")
        else:
            teacher_dir = out_dir / "smollm2"
            print("[1/5] teacher: SmolLM2-135M-Instruct from PyPI (`kforcing fetch smollm2`)")
            if not (teacher_dir / CONFIG_FILE).is_file():
                import_teacher(fetch_smollm2(cache), teacher_dir)
            print(f"      {teacher_dir}")
        student_dir = _train_draft(teacher_dir, out_dir, cache_dir(cache), minutes,
                                   conversations)
    info = student_info(student_dir)
    if info.layout != "feedback" or info.teacher_dir is None:
        raise KForcingError(f"{student_dir} is not a token-feedback student with a recorded "
                            "teacher: the demo compares one (`kforcing distill --design "
                            "feedback`)")
    return _compare(decode_weights(load_student(student_dir), dt), info.teacher_dir,
                    student_dir, out_dir, new_tokens, k)


def _trained(path: str) -> bool:
    try:
        return student_info(path).layout == "feedback"
    except KForcingError:
        return False


def _train_draft(teacher_dir: Path, out: Path, cache: Path, minutes: float,
                 conversations: int) -> Path:
    run = out / "draft"
    latest = run / "checkpoints" / "latest.json"
    if latest.is_file() and load_json(latest).get("done"):
        print(f"[2-4/5] draft: reusing {run}")
        return run
    print(f"[2/5] data: the teacher answers {conversations} questions it writes itself "
          "(bf16, cached)")
    corpus = chat_corpus(load_model(teacher_dir, dtype=torch.bfloat16), teacher_dir,
                         cache / "chat", conversations=conversations, batch_size=48)
    stats = load_json(corpus / "corpus.json")
    print(f"      {stats['conversations']} conversations, {stats['tokens']['train']} training "
          f"tokens in {corpus}")
    print(f"[3-4/5] teacher cache (its features and top-128 next-token log-probabilities), "
          f"then a one-block draft, vocabulary 8192, {minutes:g} CPU-minutes of teacher-forced "
          f"training into {run} (rerun to continue)")
    cfg = FeedbackTrainConfig(
        teacher=str(teacher_dir), data=str(corpus), out_dir=str(run), k=1,
        cache=str(out / "teacher-cache"),
        student=FeedbackConfig(max_k=4, draft_vocab_size=8192), batch_size=8, lr=2e-3,
        min_lr=2e-4, time_budget_min=minutes, eval_every_min=max(minutes, 1.0),
        eval_windows=16, ckpt_every=50, bf16=True, draft_bf16=True)
    run_feedback_stage(cfg, CacheOptions(bf16=True), resume=latest.is_file())
    atomic_write_json(latest, {**load_json(latest), "done": True})
    return run


def _compare(kf, teacher_dir: Path, student_dir: Path, out: Path, new_tokens: int,
             k: int) -> dict:
    prompts = [p for p in load_prompts() if p.id in DEMO_PROMPTS]
    tok = load_tokenizer(teacher_dir / TOKENIZER_FILE)
    tok_cfg = load_json(teacher_dir / TOKENIZER_CONFIG)
    dtype = dtype_name(kf.teacher.output.weight.dtype)
    print(f"[5/5] {len(prompts)} chat prompts at batch 1, temperature 1, up to {new_tokens} "
          f"tokens, {dtype}: AR (the teacher), lossless and K-Forcing k={k} ({student_dir})")
    res = chat_eval(kf, tok, tok_cfg, prompts,
                    ChatEvalConfig(k=k, new_tokens=new_tokens, samples=len(prompts),
                                   sample_chars=10_000))
    chat = res.eval["chat"]
    for s, row in zip(res.eval["side_by_side"], res.eval["per_prompt"], strict=True):
        print(f"\n  user      > {s['prompt']}")
        print(f"  AR        > {s['ar']}")
        same = "identical to AR" if row["lossless_identical"] else "DIFFERS from AR"
        print(f"  lossless  > ({same}, {row['tokens_per_pass']:.2f} tokens per teacher pass)")
        print(f"  K-Forcing > {s['kforcing']}")
    ar_s, ll, kfm = (chat[m]["tokens_per_s"] for m in ("ar", "lossless", "kforcing"))
    print(f"\n  AR {ar_s:.1f} tokens/s; lossless {ll:.1f} tokens/s ({ll / ar_s:.2f}x, "
          f"{chat['lossless']['tokens_per_pass']:.2f} tokens per teacher pass, "
          f"{'identical' if chat['lossless_identical'] else 'NOT identical'} answers); "
          f"K-Forcing {kfm:.1f} tokens/s ({kfm / ar_s:.2f}x)")
    print(f"  {lossless_verdict(chat['lossless']['tokens_per_pass'], ll, ar_s)}")
    summary = {"teacher": str(teacher_dir), "student": str(student_dir), "k": k, "dtype": dtype,
               "new_tokens": new_tokens, "busy": res.eval["busy"],
               "ar_tokens_per_s": round(ar_s, 2), "lossless_tokens_per_s": round(ll, 2),
               "kforcing_tokens_per_s": round(kfm, 2),
               "lossless_tokens_per_pass": round(chat["lossless"]["tokens_per_pass"], 3),
               "lossless_identical": chat["lossless_identical"],
               "gen_ppl_teacher": {"ar": res.eval["teacher"].get("gen_ppl_teacher"),
                                   "kforcing": res.eval["students"][0].get("gen_ppl_teacher")}}
    atomic_write_json(out / "demo.json", summary)
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
            f"{tokens_per_pass:.2f} tokens per pass: the student rarely matches its teacher, "
            "and a pass that verifies k tokens costs more than a one-token step on this "
            "machine, so its proposals do not pay for themselves (a longer-trained student "
            "matches more often: docs/RESULTS.md)")
