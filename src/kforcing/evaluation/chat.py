"""The chat evaluation (docs/METHOD.md, "Evaluation"; section 9 for the token-feedback student):
instruction prompts rendered with the teacher's chat template, answered at batch 1 by

- `ar`        the teacher, sampled autoregressively (the reference and the speed baseline);
- `lossless`  the student proposes k tokens, the teacher verifies: the same answer as `ar` token
              for token (every mismatch is counted and named), in fewer teacher passes;
- `kforcing`  the student's k tokens per pass, unverified: its answers are scored by the
              teacher's generative perplexity against the teacher's own.

Each prompt has its own seed, and all three methods use it, so lossless must reproduce the AR
answer exactly. Timing: one warm-up of every method, then per prompt the three methods in turn
(interleaved, so a load change hits all three alike), `repeats` sweeps over the prompts, and
per method the median over sweeps of total tokens / total seconds. The 1-minute load average
before and after, and the CPU time the process got, are recorded (decoding.machine); a busy
machine marks the result "busy" with a loud warning (evaluation.bench_machine).

`chat_eval` returns the eval.json dict and bench.jsonl rows (evaluation.bench.BenchRow);
`write_chat_eval` writes both.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kforcing.core.tree import DraftTree, parse_widths
from kforcing.decoding.autok import machine_info
from kforcing.decoding.common import GenerationResult
from kforcing.decoding.generate import generate
from kforcing.decoding.machine import Watch
from kforcing.errors import KForcingError
from kforcing.evaluation.bench import Bench, BenchConfig, BenchRow, Run
from kforcing.evaluation.bench_machine import busy_warning, usable_cores
from kforcing.evaluation.evaluate import kind_of, sampler_of
from kforcing.evaluation.quality import ragged_quality
from kforcing.evaluation.roofline import dtype_name
from kforcing.io.checkpoint import atomic_write_bytes, atomic_write_json
from kforcing.io.hub import render_chat
from kforcing.students.feedback import FeedbackStudent
from kforcing.students.pushforward import PushForward

METHODS = ("ar", "lossless", "kforcing")
PACKAGED = "chat_prompts.jsonl"     # kforcing/evaluation/data/, shipped with the package

NOTES = {
    "tokens_per_s": "generated tokens / wall seconds, pooled over all prompts at batch 1 (EOS "
                    "ends an answer), median over repeats; prefill included",
    "tokens_per_pass": "lossless: tokens emitted per teacher verification pass as the decoder "
                       "reports it, averaged over prompts",
    "tokens_per_forward_pass": "emitted tokens / every forward pass the decoder counts "
                               "(prefill included), pooled over prompts",
    "per_position_match": "lossless: share of verification passes that emitted at least j "
                          "tokens (position 1 is always the teacher's own token)",
    "lossless_mismatches": "prompts whose lossless answer differs from the seeded AR answer "
                           "(must be 0)",
    "gen_ppl_teacher": "exp(mean NLL per generated token) under the teacher at temperature 1, "
                       "given the rendered prompt, pooled over all answers",
    "unigram_entropy": "entropy (nats) of each answer's token histogram, averaged over answers",
    "distinct_n": "distinct n-grams / all n-grams, pooled over all answers",
}


# -- prompts -------------------------------------------------------------------------------------

@dataclass
class ChatPrompt:
    id: str
    kind: str
    prompt: str


def load_prompts(path: str | Path | None = None) -> list[ChatPrompt]:
    """The packaged chat evaluation set (path None), a .jsonl file (one JSON object per line
    with a "prompt"; "id" and "kind" optional) or a .txt file (one prompt per non-blank line)."""
    if path is None:
        data = resources.files("kforcing.evaluation") / "data" / PACKAGED
        text = data.read_text(encoding="utf-8")
        return _parse_jsonl(text, PACKAGED)
    p = Path(path)
    if p.suffix not in (".jsonl", ".txt"):
        raise KForcingError(f"--prompts must be a .jsonl file (a \"prompt\" field per line) or a "
                            f".txt file (one prompt per line), got '{path}'")
    if not p.is_file():
        raise KForcingError(f"prompt file not found: {path}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".txt":
        prompts = [ChatPrompt(f"p{i}", "custom", line.strip())
                   for i, line in enumerate(ln for ln in text.splitlines() if ln.strip())]
    else:
        prompts = _parse_jsonl(text, str(p))
    if not prompts:
        raise KForcingError(f"prompt file {path} holds no prompts")
    return prompts


def _parse_jsonl(text: str, name: str) -> list[ChatPrompt]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise KForcingError(f"{name} line {n} is not JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) \
                or not rec["prompt"].strip():
            raise KForcingError(f"{name} line {n} needs a non-empty string field \"prompt\"")
        out.append(ChatPrompt(str(rec.get("id", f"p{len(out)}")), str(rec.get("kind", "custom")),
                              rec["prompt"].strip()))
    ids = [p.id for p in out]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise KForcingError(f"{name} has the prompt id '{dup}' more than once")
    return out


def chat_eos(tokenizer, tok_cfg: dict | None, default: int | None) -> int | None:
    """The id that ends an answer: the chat template's eos_token when the tokenizer knows it
    (SmolLM2's <|im_end|>), else the model's own EOS."""
    if tok_cfg and tok_cfg.get("eos_token"):
        i = tokenizer.token_to_id(tok_cfg["eos_token"])
        if i is not None:
            return i
    return default


def encode_chat(tokenizer, tok_cfg: dict, messages: list[dict[str, str]]) -> list[int]:
    """A conversation through the chat template, ready for the assistant's turn (the template
    writes any BOS itself, so no special tokens are added)."""
    return tokenizer.encode(render_chat(tok_cfg, messages), add_special_tokens=False).ids


# -- the evaluation ------------------------------------------------------------------------------

@dataclass
class ChatEvalConfig:
    k: int = 4
    new_tokens: int = 256        # per answer, EOS stops earlier
    tau: float = 1.0
    seed: int = 0
    repeats: int = 1             # timed sweeps over the prompts; tokens/s is their median
    samples: int = 3             # prompts shown side by side
    sample_chars: int = 400      # answers truncated to this many characters in that table
    warmup_tokens: int = 16
    tree: str | None = None      # lossless: draft-tree widths, e.g. "4,2,1" (None: the chain)

    def __post_init__(self) -> None:
        if not 0 < self.tau < float("inf"):
            raise KForcingError(f"tau must be a finite number > 0 (K-Forcing maps noise to "
                                f"samples), got {self.tau}")
        for name in ("k", "new_tokens", "repeats", "sample_chars", "warmup_tokens"):
            if getattr(self, name) < 1:
                raise KForcingError(f"{name.replace('_', '-')} must be >= 1, got "
                                    f"{getattr(self, name)}")
        if self.samples < 0 or self.seed < 0:
            raise KForcingError("samples and seed must be >= 0")
        if self.tree:
            DraftTree(parse_widths(self.tree, self.k))   # a bad spec fails before any decoding


@dataclass
class Answers:
    """One method's answers and timings, prompt by prompt."""
    tokens: list[list[int]] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    extra: list[dict] = field(default_factory=list)
    seconds: list[list[float]] = field(default_factory=list)   # [prompt][repeat]
    counts: list[int] = field(default_factory=list)            # tokens emitted per pass


@dataclass
class ChatEvalResult:
    eval: dict
    rows: list[BenchRow]


def check_chat_student(student) -> None:
    if not isinstance(student, PushForward | FeedbackStudent):
        raise KForcingError(f"the chat evaluation needs a K-Forcing student (a token-feedback "
                            f"or PushForward student), got a {type(student).__name__}")


def chat_eval(student, tokenizer, tok_cfg: dict, prompts: list[ChatPrompt],
              cfg: ChatEvalConfig | None = None, *, teacher=None, command: str = "",
              progress: bool = False) -> ChatEvalResult:
    """AR, lossless and K-Forcing answers to every prompt (module docstring). `teacher`: the AR
    model of a shared-layout PushForward student (students that hold theirs ignore it)."""
    cfg = cfg or ChatEvalConfig()
    check_chat_student(student)
    if not prompts:
        raise KForcingError("no prompts to evaluate")
    ref = student.teacher if student.teacher is not None else teacher
    if ref is None:
        raise KForcingError("this shared-layout student needs its teacher (teacher=...)")
    verifier = None if student.teacher is not None else teacher
    eos = chat_eos(tokenizer, tok_cfg, ref.config.eos_id)
    ids = [encode_chat(tokenizer, tok_cfg, [{"role": "user", "content": p.prompt}])
           for p in prompts]
    seeds = [(cfg.seed << 32) + i for i in range(len(prompts))]
    context = ref.config.max_seq_len
    for p, x in zip(prompts, ids, strict=True):
        if len(x) + cfg.new_tokens + 2 * cfg.k > context:
            raise KForcingError(f"prompt '{p.id}' renders to {len(x)} tokens: with new-tokens "
                                f"{cfg.new_tokens} (+ {2 * cfg.k} for windows) it exceeds the "
                                f"teacher's context of {context} tokens")
    was_training = student.training
    student.eval()

    def run(method: str, i: int, n: int, counts: list[int] | None = None) -> GenerationResult:
        def count(new: list[list[int]]) -> None:
            if counts is not None and new[0]:
                counts.append(len(new[0]))
        return generate(student, [ids[i]], n, mode=method, k=None if method == "ar" else cfg.k,
                        temperature=cfg.tau, seed=seeds[i], eos_id=eos, teacher=verifier,
                        on_tokens=count, tree=cfg.tree if method == "lossless" else None)

    for method in METHODS:      # warm-up, excluded
        run(method, 0, min(cfg.warmup_tokens, cfg.new_tokens))
    answers = {m: Answers() for m in METHODS}
    watch = Watch(torch.get_num_threads())
    for i in tqdm(range(len(prompts)), desc="chat prompts", disable=not progress,
                  dynamic_ncols=True):
        secs: dict[str, list[float]] = {m: [] for m in METHODS}
        for r in range(cfg.repeats):
            for method in METHODS:
                a = answers[method]
                t = time.perf_counter()
                res = run(method, i, cfg.new_tokens, a.counts if r == 0 else None)
                secs[method].append(time.perf_counter() - t)
                if r == 0:
                    a.tokens.append(res.tokens[0])
                    a.passes.append(res.forward_passes)
                    a.finished.append(res.finished[0])
                    a.extra.append(dict(res.extra))
        for method in METHODS:
            answers[method].seconds.append(secs[method])
    usage = watch.stop().record()
    student.train(was_training)

    machine = {**machine_info(), "dtype": dtype_name(ref.output.weight.dtype),
               "device": str(ref.output.weight.device), "cores_pinned": usable_cores(), **usage}
    bcfg = BenchConfig(batch_sizes=(1,), prompt_len=round(statistics.mean(map(len, ids))),
                       new_tokens=cfg.new_tokens, repeats=cfg.repeats, methods=METHODS,
                       temperature=cfg.tau, seed=cfg.seed, roofline=False)
    bench = Bench(ref, student, None, bcfg, machine, command)
    mismatched = [p.id for p, a, b in zip(prompts, answers["ar"].tokens,
                                          answers["lossless"].tokens, strict=True) if a != b]
    summary = {m: _summary(m, answers[m], cfg) for m in METHODS}
    summary["lossless"]["mismatches"] = len(mismatched)
    rows = [bench.row(m, 1 if m == "ar" else cfg.k, "sample", _runs(answers[m], cfg.repeats), 1,
                      {**summary[m], "prompts": len(prompts), "source": "chat"})
            for m in METHODS]
    ar_speed = rows[0].tokens_per_s
    chat = {**summary, "lossless_mismatches": len(mismatched), "mismatched_ids": mismatched,
            "lossless_identical": not mismatched,
            "speedup_over_ar": {m: r.tokens_per_s / ar_speed if ar_speed else None
                                for m, r in zip(METHODS, rows, strict=True) if m != "ar"}}
    for m, r in zip(METHODS, rows, strict=True):
        chat[m]["tokens_per_s"] = r.tokens_per_s
    result = _eval_dict(student, ref, tokenizer, prompts, ids, seeds, answers, cfg, chat)
    result.update(command=command, commands=[command] if command else [], machine=machine,
                  busy=usage["busy"], busy_warning=busy_warning(rows), notes=NOTES)
    return ChatEvalResult(result, rows)


def _runs(a: Answers, repeats: int) -> list[Run]:
    """One Run per timed sweep over the prompts: total tokens, passes and seconds."""
    return [Run(sum(map(len, a.tokens)), sum(a.passes), sum(s[r] for s in a.seconds))
            for r in range(repeats)]


def _summary(method: str, a: Answers, cfg: ChatEvalConfig) -> dict:
    n = len(a.tokens)
    tokens = sum(map(len, a.tokens))
    out = {"tokens": tokens, "mean_tokens": tokens / n, "finished_at_eos": sum(a.finished),
           "forward_passes": sum(a.passes),
           "seconds": sum(statistics.median(s) for s in a.seconds),
           "mean_seconds": statistics.mean(statistics.median(s) for s in a.seconds),
           "tokens_per_forward_pass": tokens / max(sum(a.passes), 1)}
    if method != "ar":
        per = [e.get("tokens_per_pass") for e in a.extra]
        out["tokens_per_pass"] = (statistics.mean(per) if None not in per
                                  else out["tokens_per_forward_pass"])
        out["k"] = cfg.k
    if method == "lossless":
        out["tree"] = cfg.tree
    if method == "lossless" and a.counts:
        out["per_position_match"] = [round(sum(c >= j for c in a.counts) / len(a.counts), 4)
                                     for j in range(1, cfg.k + 1)]
    return out


def _eval_dict(student, teacher, tok, prompts: list[ChatPrompt], ids: list[list[int]],
               seeds: list[int], answers: dict[str, Answers], cfg: ChatEvalConfig,
               chat: dict) -> dict:
    """The eval.json dict, with docs/results/eval.json's keys where they apply."""
    order, coupling = sampler_of(student)
    ar, lossless, kf = (answers[m] for m in METHODS)

    def text(t: list[int]) -> str:
        return tok.decode(t, skip_special_tokens=True).strip()

    def cut(s: str) -> str:
        return s if len(s) <= cfg.sample_chars else s[:cfg.sample_chars].rstrip() + " …"

    n = cfg.samples
    t0 = time.perf_counter()
    teacher_q = ragged_quality(teacher, ids, ar.tokens)
    student_q = ragged_quality(teacher, ids, kf.tokens)
    side = [{"id": p.id, "prompt": p.prompt, "ar": cut(text(a)), "kforcing": cut(text(b))}
            for p, a, b in zip(prompts[:n], ar.tokens, kf.tokens, strict=False)]
    teacher_entry = {"tau": cfg.tau, "cdf_order": order, "coupling": coupling,
                     "n_samples": len(prompts), "new_tokens": cfg.new_tokens,
                     "mean_tokens": chat["ar"]["mean_tokens"], **teacher_q,
                     "samples": [{"prompt": s["prompt"], "text": s["ar"]} for s in side],
                     "seconds": round(chat["ar"]["seconds"], 2)}
    per_position = chat["lossless"].get("per_position_match")
    student_entry = {"k": cfg.k, "tau": cfg.tau, **kind_of(student), "cdf_order": order,
                     "coupling": coupling,
                     **({"per_position_match": per_position} if per_position else {}),
                     "mean_tokens": chat["kforcing"]["mean_tokens"], **student_q,
                     "samples": [{"prompt": s["prompt"], "teacher": s["ar"],
                                  "student": s["kforcing"]} for s in side],
                     "seconds": round(chat["kforcing"]["seconds"], 2),
                     "lossless": chat["lossless"]}
    per_prompt = [{"id": p.id, "kind": p.kind, "seed": s, "prompt_tokens": len(x),
                   **{f"{m}_tokens": len(answers[m].tokens[i]) for m in METHODS},
                   "lossless_identical": ar.tokens[i] == lossless.tokens[i],
                   "tokens_per_pass": lossless.extra[i].get("tokens_per_pass"),
                   "seconds": {m: round(statistics.median(answers[m].seconds[i]), 4)
                               for m in METHODS}}
                  for i, (p, s, x) in enumerate(zip(prompts, seeds, ids, strict=True))]
    chat["quality_seconds"] = round(time.perf_counter() - t0, 2)
    return {"config": {**asdict(cfg), "prompts": len(prompts)}, "head": kind_of(student)["head"],
            "layout": kind_of(student)["layout"], "teacher": teacher_entry,
            "students": [student_entry], "chat": chat, "side_by_side": side,
            "per_prompt": per_prompt}


def write_chat_eval(result: ChatEvalResult, out: str | Path) -> dict[str, Path]:
    """<out>/eval.json and <out>/bench.jsonl (docs/results/bench.jsonl's row schema)."""
    out = Path(out)
    paths = {"eval": out / "eval.json", "bench": out / "bench.jsonl"}
    atomic_write_json(paths["eval"], result.eval)
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in result.rows)
    atomic_write_bytes(paths["bench"], lines.encode())
    return paths
