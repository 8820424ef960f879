"""Fidelity and sample quality of K-Forcing students against their teacher (docs/METHOD.md,
"Evaluation").

Every method sees the same held-out contexts, prompts and noise:
- match and first-token TV (evaluation/match.py) on held-out contexts;
- free-running samples (held-out prompt -> L tokens) of the teacher and of each student, made
  by the real decoders from the same per-prompt noise, scored by evaluation/quality.py.

`evaluate` runs all of it and returns the dict `kforcing eval` writes as JSON
(recipes/eval_report.py renders it as markdown).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import summarize_matches, window_match
from kforcing.decoding.generate import generate
from kforcing.errors import KForcingError
from kforcing.evaluation.match import (
    MatchSet,
    build_match_set,
    first_token_tv,
    held_out_blocks,
    match_rates,
)
from kforcing.evaluation.quality import decode, sample_quality
from kforcing.io.tokens import TokenFile
from kforcing.students.feedback import FeedbackStudent
from kforcing.students.pushforward import check_k

# -- free-running samples: the real decoders, explicit noise --------------------------------------

def rollout_ar(teacher, prompts: torch.Tensor, noise: NoiseStream, new_tokens: int, tau: float,
               order: str = "vocab", coupling: str = "inverse-cdf") -> torch.Tensor:
    """Teacher samples: prompts (B, P) -> (B, L) tokens, token j drawn with noise index j of
    row b (through the student's CDF order or coupling). No EOS stop: every sample has L
    tokens."""
    res = generate_ar(teacher, prompts.tolist(), new_tokens, noise=noise, stop_at_eos=False,
                      sampling=SamplingConfig(temperature=tau, cdf_order=order,
                                              coupling=coupling))
    return torch.tensor(res.tokens, dtype=torch.long, device=prompts.device)


def rollout_kforcing(student, prompts: torch.Tensor, noise: NoiseStream, new_tokens: int,
                     tau: float, k: int) -> torch.Tensor:
    """Student samples from the same noise (window n reads uniforms n .. n + k - 1), so a
    student that equals the teacher's sampler reproduces rollout_ar token for token. Any
    student kind (PushForward layouts, the token-feedback student) through `generate`."""
    res = generate(student, prompts.tolist(), new_tokens, mode="kforcing", k=k, noise=noise,
                   stop_at_eos=False, temperature=tau)
    return torch.tensor(res.tokens, dtype=torch.long, device=prompts.device)


# -- the whole evaluation ------------------------------------------------------------------------

@dataclass
class EvalConfig:
    tau: float = 1.0
    new_tokens: int = 128        # L tokens per free-running sample
    prompts: int = 64            # held-out prompts = samples per method
    prompt_len: int = 64
    context_len: int = 64        # held-out contexts of the match set and of the TV estimate
    windows: int = 512           # match windows: the last 8 positions of windows/8 contexts
    tv_contexts: int = 32
    tv_draws: int = 1024         # uniforms per context for the first-token distribution
    samples: int = 3             # decoded sample texts kept per method
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.tau < math.inf:
            raise KForcingError(f"tau must be a finite number > 0, got {self.tau}")
        for name in ("new_tokens", "prompts", "prompt_len", "context_len", "windows",
                     "tv_contexts", "tv_draws", "batch_size"):
            if getattr(self, name) < 1:
                raise KForcingError(f"{name.replace('_', '-')} must be >= 1, got "
                                    f"{getattr(self, name)}")
        if self.context_len < 8:
            raise KForcingError(f"context-len must be >= 8 (8 match windows per context), got "
                                f"{self.context_len}")
        if self.samples < 0:
            raise KForcingError(f"samples must be >= 0, got {self.samples}")


@dataclass
class EvalSet:
    """What every method is evaluated on, fixed by the held-out split and the seed."""

    tokens: TokenFile
    cfg: EvalConfig
    prompts: torch.Tensor            # (B, P) held-out prompts
    noise: NoiseStream               # (B rows) noise driving every free-running sample
    tv_x: torch.Tensor               # (C, N) the match set's first C contexts
    tv_u: torch.Tensor               # (C, S) first-token uniforms
    _match: dict = field(default_factory=dict)
    _teacher_samples: dict = field(default_factory=dict)

    def match_set(self, teacher, k: int, order: str) -> MatchSet:
        if (k, order) not in self._match:
            self._match[k, order] = build_match_set(
                teacher, self.tokens, k=k, block_size=self.cfg.context_len,
                n_windows=self.cfg.windows, taus=[self.cfg.tau], order=order, seed=self.cfg.seed,
                device=self.prompts.device)
        return self._match[k, order]

    def teacher_samples(self, teacher, order: str, progress: bool = False,
                        coupling: str = "inverse-cdf") -> torch.Tensor:
        if (order, coupling) not in self._teacher_samples:
            self._teacher_samples[order, coupling] = _batched(
                lambda p, noise: rollout_ar(teacher, p, noise, self.cfg.new_tokens,
                                            self.cfg.tau, order, coupling),
                self, "teacher samples", progress)
        return self._teacher_samples[order, coupling]


def _batched(fn, eset: EvalSet, desc: str, progress: bool) -> torch.Tensor:
    """fn(prompts, noise) over batches of the eval set's prompts, concatenated: (B, L)."""
    bs = eset.cfg.batch_size
    B = eset.prompts.shape[0]
    starts = range(0, B, bs)
    return torch.cat([fn(eset.prompts[s:s + bs], eset.noise.rows(range(s, min(s + bs, B))))
                      for s in tqdm(starts, desc=desc, disable=not progress, leave=False)])


def build_eval_set(teacher, tokens: TokenFile, cfg: EvalConfig, k_max: int = 1) -> EvalSet:
    """Draw the prompts, the contexts and all noise from the seed (same for every method)."""
    mcfg = teacher.config
    if tokens.vocab_size is not None and tokens.vocab_size > mcfg.vocab_size:
        raise KForcingError(f"{tokens.path} has a {tokens.vocab_size}-token vocabulary but the "
                            f"teacher only {mcfg.vocab_size}: mismatched tokenizer")
    need = cfg.prompt_len + cfg.new_tokens + 2 * k_max
    if need > mcfg.max_seq_len:
        raise KForcingError(f"prompt-len {cfg.prompt_len} + new-tokens {cfg.new_tokens} (+ "
                            f"{2 * k_max} for windows) exceeds the model's context of "
                            f"{mcfg.max_seq_len} tokens")
    device = next(teacher.parameters()).device
    g = torch.Generator().manual_seed(20_000 + cfg.seed)
    prompts = held_out_blocks(tokens, cfg.prompts, cfg.prompt_len, g)
    if prompts.shape[0] < cfg.prompts:
        raise KForcingError(f"the held-out split has only {prompts.shape[0]} prompts of "
                            f"{cfg.prompt_len} tokens, {cfg.prompts} asked for")
    # prompt b of eval seed s samples with row seed s * 2^32 + b: distinct across seeds
    noise = NoiseStream([(cfg.seed << 32) + b for b in range(prompts.shape[0])], device)
    # the same draw as build_match_set's contexts, so the TV contexts are the match contexts
    g_ctx = torch.Generator().manual_seed(10_000 + cfg.seed)
    tv_x = held_out_blocks(tokens, cfg.tv_contexts, cfg.context_len, g_ctx)
    tv_u = torch.rand(tv_x.shape[0], cfg.tv_draws,
                      generator=torch.Generator().manual_seed(30_000 + cfg.seed),
                      dtype=torch.float64)
    return EvalSet(tokens, cfg, prompts.to(device), noise, tv_x.to(device), tv_u.to(device))


def sampler_of(student) -> tuple[str, str]:
    """(cdf_order, coupling) a student samples with, so the teacher's reference samples use the
    same map from noise to tokens: a PushForward student its CDF order, the token-feedback
    student its coupling (docs/METHOD.md section 9)."""
    if isinstance(student, FeedbackStudent):
        return "vocab", student.config.coupling
    return student.config.cdf_order, "inverse-cdf"


def kind_of(student) -> dict:
    """{"head", "layout"} of any student kind: the token-feedback student is "feedback" in
    both."""
    if isinstance(student, FeedbackStudent):
        return {"head": "feedback", "layout": "feedback"}
    return {"head": student.config.head, "layout": student.config.layout}


def check_student(student, teacher) -> None:
    ours, theirs = student.model_config, teacher.config
    if ours.vocab_size != theirs.vocab_size:
        raise KForcingError(f"the student has a {ours.vocab_size}-token vocabulary, its teacher "
                            f"{theirs.vocab_size}: mismatched teacher")


def evaluate_teacher(teacher, eset: EvalSet, *, order: str = "vocab", tokenizer=None, judge=None,
                     progress: bool = False, coupling: str = "inverse-cdf") -> dict:
    """The teacher's own samples, scored like the students' (the reference column)."""
    t0 = time.perf_counter()
    samples = eset.teacher_samples(teacher, order, progress, coupling)
    out = {"tau": eset.cfg.tau, "cdf_order": order, "coupling": coupling,
           "n_samples": samples.shape[0],
           "new_tokens": samples.shape[1],
           **sample_quality(teacher, eset.prompts, samples, tokenizer=tokenizer, judge=judge,
                            batch_size=eset.cfg.batch_size, progress=progress)}
    if tokenizer is not None:
        n = eset.cfg.samples
        out["samples"] = [{"prompt": p, "text": t} for p, t in zip(
            decode(tokenizer, eset.prompts[:n]), decode(tokenizer, samples[:n]), strict=True)]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def evaluate_student(student, teacher, tokens: TokenFile, *, k: int | None = None,
                     cfg: EvalConfig | None = None, eset: EvalSet | None = None, tokenizer=None,
                     judge=None, progress: bool = False) -> dict:
    """One student at window k (default: its max_k) against its teacher: match with the exact AR
    rollout, first-token TV and the quality of its free-running samples. Pass the same `eset`
    to compare several students on the same prompts and uniforms (the default builds it from
    cfg.seed, which gives the same set again)."""
    cfg = eset.cfg if eset is not None else cfg or EvalConfig()
    k = student.config.max_k if k is None else k
    check_k(k, student.config.max_k)
    check_student(student, teacher)
    eset = eset or build_eval_set(teacher, tokens, cfg, k)
    if cfg.prompt_len + cfg.new_tokens + 2 * k > student.model_config.max_seq_len:
        raise KForcingError(f"prompt-len + new-tokens + 2k = "
                            f"{cfg.prompt_len + cfg.new_tokens + 2 * k} exceeds the student's "
                            f"context of {student.model_config.max_seq_len} tokens")
    t0 = time.perf_counter()
    order, coupling = sampler_of(student)
    was_training = student.training
    student.eval()
    fidelity = (_feedback_fidelity(student, eset, k) if isinstance(student, FeedbackStudent)
                else _pushforward_fidelity(student, teacher, eset, k, progress))
    samples = _batched(lambda p, noise: rollout_kforcing(student, p, noise, cfg.new_tokens,
                                                         cfg.tau, k),
                       eset, f"k={k} samples", progress)
    ref = eset.teacher_samples(teacher, order, progress, coupling)
    differ = torch.cat([samples != ref, torch.ones_like(ref[:, :1], dtype=torch.bool)], 1)
    out = {"k": k, "tau": cfg.tau, **kind_of(student), "cdf_order": order, "coupling": coupling,
           **fidelity,
           # tokens before the free-running sample first leaves the teacher's (same uniforms)
           "agree_prefix": float(differ.float().argmax(1).double().mean()),
           **sample_quality(teacher, eset.prompts, samples, tokenizer=tokenizer, judge=judge,
                            batch_size=cfg.batch_size, progress=progress)}
    if tokenizer is not None:
        n = cfg.samples
        out["samples"] = [{"prompt": p, "teacher": t, "student": s} for p, t, s in zip(
            decode(tokenizer, eset.prompts[:n]), decode(tokenizer, ref[:n]),
            decode(tokenizer, samples[:n]), strict=True)]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    student.train(was_training)
    return out


def _pushforward_fidelity(student, teacher, eset: EvalSet, k: int, progress: bool) -> dict:
    """Window match against the exact AR rollout and the first token's TV (evaluation/match.py)."""
    rates = match_rates(student, eset.match_set(teacher, k, student.config.cdf_order))
    rates = rates[f"tau{eset.cfg.tau:g}"]
    return {"first_token_match": rates["first"], "joint_match": rates["joint"],
            "per_position_match": rates["per_pos"], "match_windows": rates["windows"],
            **first_token_tv(student, teacher, eset.tv_x, eset.tv_u, eset.cfg.tau,
                             progress=progress)}


def _feedback_fidelity(student: FeedbackStudent, eset: EvalSet, k: int, chunk: int = 64
                       ) -> dict:
    """The token-feedback student's window against the teacher's own chain under the same noise
    (decoding.feedback.window_match), one window after each of `windows` held-out contexts. Its
    first token is the teacher's exact sample, so the first-token TV is 0 by construction."""
    cfg = eset.cfg
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    contexts = held_out_blocks(eset.tokens, cfg.windows, cfg.context_len, g)
    contexts = contexts.to(eset.prompts.device)
    sampling = SamplingConfig(temperature=cfg.tau, coupling=student.config.coupling)
    # window i of eval seed s reads row seed s * 2^32 + 2^31 + i: apart from the samples' rows
    base = (cfg.seed << 32) + (1 << 31)
    parts = [window_match(student, contexts[i:i + chunk], k, sampling,
                          NoiseStream([base + j for j in range(i, min(i + chunk, len(contexts)))],
                                      contexts.device))
             for i in range(0, len(contexts), chunk)]
    m = summarize_matches(parts)
    return {"first_token_match": m["per_position"][0], "joint_match": m["joint"],
            "per_position_match": m["per_position"], "match_windows": m["windows"],
            "overlap2": m["overlap2"], "implied_tokens_per_pass": m["tokens_per_pass"],
            "first_token_tv": 0.0, "first_token_tv_se": 0.0, "first_token_tv_bias_bound": 0.0,
            "first_token_tv_coupling_bound": 0.0}


def evaluate(teacher, tokens: TokenFile, runs: list[tuple[str, object, int]], *,
             cfg: EvalConfig | None = None, tokenizer=None, judge=None, progress: bool = False
             ) -> dict:
    """{'config', 'teacher', 'students'}: the teacher's own samples and one entry per run
    (label, student, k), all on the same contexts, prompts and noise."""
    cfg = cfg or EvalConfig()
    for _, student, k in runs:
        check_k(k, student.config.max_k)
        check_student(student, teacher)
    eset = build_eval_set(teacher, tokens, cfg, max((k for *_, k in runs), default=1))
    order, coupling = sampler_of(runs[0][1]) if runs else ("vocab", "inverse-cdf")
    result = {"config": asdict(cfg),
              "teacher": evaluate_teacher(teacher, eset, order=order, tokenizer=tokenizer,
                                          judge=judge, progress=progress, coupling=coupling),
              "students": []}
    for label, student, k in tqdm(runs, desc="students", disable=not progress or len(runs) < 2):
        entry = evaluate_student(student, teacher, tokens, k=k, eset=eset, tokenizer=tokenizer,
                                 judge=judge, progress=progress)
        result["students"].append({"student": label, **entry})
    return result
