"""Fidelity and sample quality of a K-Forcing student against its teacher (METHOD.md section 7).

Every method sees the same held-out contexts, prompts and uniforms:
- match: how often the student's window equals the teacher's exact AR rollout G(context, u_1..u_k)
  for the same uniforms (first token, whole window, per position);
- first-token TV: distance between the student's push-forward distribution of its first token and
  the teacher's next-token distribution, Monte Carlo over uniforms;
- free-running samples (held-out prompt -> L tokens) of the teacher and of the student, driven by
  the same uniforms: perplexity under the teacher, under an independent judge LM, unigram entropy
  and distinct-n.

`evaluate` runs all of it and returns the dict `kforcing eval` writes as JSON; `eval_markdown`
renders that dict as the report's tables.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kforcing.io.data import TokenFile
from kforcing.errors import KForcingError
from kforcing.core.kv_cache import KVCache
from kforcing.students.pushforward import check_k
from kforcing.core.sampling import inverse_cdf


@dataclass
class MatchSet:
    x: torch.Tensor                                   # (C, N) held-out contexts
    anchors: torch.Tensor                             # (M,) window anchors in every context
    u: torch.Tensor                                   # (C, M, k) uniforms
    targets: dict[float, torch.Tensor]                # tau -> (C, M, k) exact AR rollouts


def held_out_blocks(tokens: TokenFile, n: int, length: int, generator: torch.Generator
                    ) -> torch.Tensor:
    """Up to n distinct random blocks of `length` tokens from a split: (n', length), n' <= n."""
    n_blocks = tokens.num_blocks(length)
    if n_blocks == 0:
        raise KForcingError(f"held-out split {tokens.path} is shorter than one block of "
                            f"{length} tokens")
    idx = torch.randperm(n_blocks, generator=generator)[:n]
    return torch.stack([torch.from_numpy(tokens.block(int(i), length)[:-1]) for i in idx])


@torch.no_grad()
def build_match_set(teacher, tokens: TokenFile, *, k: int, block_size: int, n_windows: int,
                    taus: list[float], order: str, seed: int = 0, per_context: int = 8,
                    device: str | torch.device = "cpu", chunk: int = 32) -> MatchSet:
    """n_windows windows: the last `per_context` positions of randomly drawn held-out blocks."""
    from kforcing.training.distill import ar_rollout

    g = torch.Generator().manual_seed(10_000 + seed)
    x = held_out_blocks(tokens, max(1, n_windows // per_context), block_size, g).to(device)
    C, N = x.shape
    anchors = torch.arange(N - per_context, N, device=device)
    u = torch.rand(C, per_context, k, generator=g, dtype=torch.float64).to(device)
    targets = {}
    for tau_v in sorted(set(taus)):
        tau = torch.full((C,), float(tau_v), dtype=torch.float64, device=device)
        targets[tau_v] = torch.cat([
            ar_rollout(teacher, x[s:s + chunk], u[s:s + chunk], tau[s:s + chunk], anchors, order)
            for s in range(0, C, chunk)])
    return MatchSet(x, anchors, u, targets)


@torch.no_grad()
def match_rates(student, mset: MatchSet, chunk: int = 32) -> dict:
    """{'tau1': {'first', 'joint', 'per_pos', 'windows'}, ...} for one student."""
    was_training = student.training
    student.eval()
    out = {}
    for tau_v, y in mset.targets.items():
        eqs = []
        for s in range(0, mset.x.shape[0], chunk):
            x = mset.x[s:s + chunk]
            tau = torch.full((x.shape[0],), float(tau_v), dtype=torch.float64, device=x.device)
            toks = student.staircase_forward(x, mset.u[s:s + chunk], tau, mset.anchors).tokens
            eqs.append(toks == y[s:s + chunk])
        eq = torch.cat(eqs)                                                 # (C, M, k)
        out[f"tau{tau_v:g}"] = {"first": float(eq[..., 0].float().mean()),
                                "joint": float(eq.all(-1).float().mean()),
                                "per_pos": [round(float(m), 4) for m in eq.float().mean((0, 1))],
                                "windows": int(eq.shape[0] * eq.shape[1])}
    student.train(was_training)
    return out


# -- the first token's distribution --------------------------------------------------------------

@torch.no_grad()
def first_token_tv(student, teacher, x: torch.Tensor, u: torch.Tensor, tau: float, *,
                   chunk: int = 256, progress: bool = False) -> dict:
    """TV distance between the student's first token and the teacher's next token after each
    context, averaged over contexts. x (C, N) contexts, u (C, S) uniforms (S draws per context).

    The teacher's distribution p enters exactly through its own inverse-CDF sampler T(u), which
    draws from p exactly: with Z_i(u) = 1[student(u) = i] - 1[T(u) = i], q_i - p_i = E[Z_i], so
    d_i = mean of Z_i over the S draws estimates q_i - p_i without bias, and the same uniforms
    make it a control variate (exactly 0 for a student that samples like the teacher). The plug-in
    0.5 sum |d_i| is biased upwards: 0 <= E[plug-in] - TV <= 0.5 sum sqrt(Var d_i), the
    `bias_bound` reported. Also reported: the standard error over contexts and the coupling
    bound TV <= P(student(u) != T(u)).
    """
    from kforcing.training.distill import teacher_conditionals

    C, N = x.shape
    S = u.shape[1]
    order = student.config.cdf_order
    anchor = torch.tensor([N - 1], device=x.device)
    no_known = torch.zeros(C, 1, 0, dtype=torch.long, device=x.device)
    logits = teacher_conditionals(teacher, x, no_known, anchor)[:, 0, 0]      # (C, V)
    V = logits.shape[-1]
    probs = (logits.float() / torch.tensor(float(tau), dtype=torch.float64).float()).softmax(-1)
    tau_c = torch.full((C,), float(tau), dtype=torch.float64, device=x.device)
    ours = torch.empty(C, S, dtype=torch.long, device=x.device)
    theirs = torch.empty_like(ours)
    # the first token of a window does not depend on the window's length: draw windows of 1
    steps = [(c, s) for c in range(C) for s in range(0, S, chunk)]
    for c, s in tqdm(steps, desc="first-token TV", disable=not progress, leave=False):
        uu = u[c:c + 1, s:s + chunk]                                        # (1, S')
        anchors = anchor.expand(uu.shape[1])
        ours[c, s:s + chunk] = student.staircase_forward(
            x[c:c + 1], uu[..., None], tau_c[c:c + 1], anchors).tokens[0, :, 0]
        theirs[c, s:s + chunk] = inverse_cdf(probs[c].expand(uu.shape[1], V), uu[0], order)
    tv, bias, mismatch = [], [], []
    for c in range(C):
        q = torch.bincount(ours[c], minlength=V).double() / S
        p = torch.bincount(theirs[c], minlength=V).double() / S
        same = ours[c][ours[c] == theirs[c]]
        both = torch.bincount(same, minlength=V).double() / S
        d = q - p
        var = (q + p - 2 * both - d ** 2).clamp(min=0) * S / max(S - 1, 1)   # Var Z_i, unbiased
        tv.append(0.5 * float(d.abs().sum()))
        bias.append(0.5 * float((var / S).sqrt().sum()))
        mismatch.append(float((ours[c] != theirs[c]).double().mean()))
    tvs = torch.tensor(tv, dtype=torch.float64)
    se = float(tvs.std() / math.sqrt(C)) if C > 1 else None
    return {"first_token_tv": float(tvs.mean()), "first_token_tv_se": se,
            "first_token_tv_bias_bound": sum(bias) / C,
            "first_token_tv_coupling_bound": sum(mismatch) / C,
            "tv_contexts": C, "tv_draws": S}


# -- free-running samples ------------------------------------------------------------------------

@torch.no_grad()
def rollout_ar(teacher, prompts: torch.Tensor, u: torch.Tensor, tau: float,
               order: str = "vocab") -> torch.Tensor:
    """Teacher samples from explicit uniforms: prompts (B, P), u (B, L) -> (B, L) tokens, token t
    = InvCDF(p(. | prompt, y_<t) at tau, u[:, t]). No EOS stop, so every sample has L tokens."""
    B, P = prompts.shape
    L = u.shape[1]
    t = torch.tensor(float(tau), dtype=torch.float64).float()
    cache = KVCache.for_model(teacher, B, max_len=P + L)
    pos = torch.arange(P, device=prompts.device).expand(B, P)
    logits = teacher(prompts, input_pos=pos, cache=cache, last_only=True)[:, -1]
    out = torch.empty(B, L, dtype=torch.long, device=prompts.device)
    for j in range(L):
        out[:, j] = inverse_cdf((logits.float() / t).softmax(-1), u[:, j], order)
        if j + 1 < L:
            logits = teacher(out[:, j:j + 1], input_pos=pos[:, -1:] + j + 1, cache=cache)[:, -1]
    return out


@torch.no_grad()
def rollout_kforcing(student, prompts: torch.Tensor, u: torch.Tensor, tau: float, k: int
                     ) -> torch.Tensor:
    """Student samples from the same uniforms: pass j reads u[:, jk:(j+1)k], so a student that
    equals the teacher's sampler reproduces rollout_ar token for token. (B, P), (B, L) -> (B, L)."""
    check_k(k, student.config.max_k)
    B, P = prompts.shape
    L = u.shape[1]
    device = prompts.device
    cache = KVCache.for_model(student.context_model, B, max_len=P + L + 2 * k)
    tau_b = torch.full((B,), float(tau), dtype=torch.float64, device=device)
    real, real_pos = prompts, torch.arange(P, device=device).expand(B, P)
    out = []
    for s in range(0, L, k):
        toks = student.window_pass(cache, real, real_pos, u[:, s:s + k], tau_b).tokens[:, 0]
        out.append(toks)                                                    # (B, <=k)
        real = toks
        real_pos = real_pos[:, -1:] + torch.arange(1, toks.shape[1] + 1, device=device)
    return torch.cat(out, dim=1)


@torch.no_grad()
def token_nll(model, prompts: torch.Tensor, samples: torch.Tensor, batch_size: int = 16
              ) -> torch.Tensor:
    """-log p(sample_t | prompt, sample_<t) under a Transformer at temperature 1: (B, L)."""
    P = prompts.shape[1]
    out = []
    for s in range(0, prompts.shape[0], batch_size):
        y = samples[s:s + batch_size]
        seq = torch.cat([prompts[s:s + batch_size], y], dim=1)
        logits = model(seq[:, :-1])[:, P - 1:]                              # (b, L, V)
        out.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none"))
    return torch.cat(out)


def generative_perplexity(model, prompts: torch.Tensor, samples: torch.Tensor,
                          batch_size: int = 16) -> float:
    """exp(mean NLL per generated token) of samples (B, L) after prompts (B, P) under `model`."""
    return math.exp(float(token_nll(model, prompts, samples, batch_size).double().mean()))


def unigram_entropy(tokens: list[int]) -> float:
    """Entropy (nats) of one sample's empirical token distribution; repetition lowers it."""
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values()) if n else 0.0


def distinct_n(rows: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over samples (diversity within and across)."""
    grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ids(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids if hasattr(enc, "ids") else enc)


@torch.no_grad()
def judge_perplexity(texts: list[str], hf_model, hf_tokenizer, prompts: list[str] | None = None,
                     batch_size: int = 8, progress: bool = False) -> float:
    """Perplexity of `texts` under an independent causal LM (any transformers model + tokenizer),
    re-tokenized with the judge's own tokenizer. With prompts, text i is scored after prompts[i]
    and only its own tokens count; without, every token but each text's first."""
    rows = []
    limit = getattr(hf_model.config, "max_position_embeddings", None) or 1 << 30
    for i, text in enumerate(texts):
        y = _ids(hf_tokenizer, text)[:limit]
        ctx = _ids(hf_tokenizer, prompts[i]) if prompts is not None else []
        rows.append((ctx[max(0, len(ctx) - (limit - len(y))):], y))
    pad = getattr(hf_tokenizer, "pad_token_id", None) or 0
    device = next(hf_model.parameters()).device
    nll, count = 0.0, 0
    starts = range(0, len(rows), batch_size)
    for s in tqdm(starts, desc="judge", disable=not progress, leave=False):
        batch = rows[s:s + batch_size]
        T = max(len(c) + len(y) for c, y in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        attn = torch.zeros(len(batch), T, dtype=torch.long)
        scored = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, (c, y) in enumerate(batch):
            ids[b, :len(c) + len(y)] = torch.tensor(c + y, dtype=torch.long)
            attn[b, :len(c) + len(y)] = 1
            scored[b, max(len(c), 1):len(c) + len(y)] = True
        ids, attn, scored = ids.to(device), attn.to(device), scored.to(device)
        logits = hf_model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        tok_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll += float(tok_nll[scored[:, 1:]].double().sum())
        count += int(scored.sum())
    if count == 0:
        raise KForcingError("the judge has no tokens to score (empty texts)")
    return math.exp(nll / count)


def load_judge(spec: str, cache: str | Path | None = None, device: str = "cpu"):
    """'smollm2' (fetched into the cache), a .gguf path, or 'none' -> ((model, tokenizer) | None,
    description)."""
    if spec == "none":
        return None, None
    from kforcing.io.hub import fetch_smollm2, load_gguf
    if spec == "smollm2":
        path = Path(fetch_smollm2(cache=cache))
    else:
        path = Path(spec)
        if path.suffix != ".gguf" or not path.is_file():
            raise KForcingError(f"--judge must be 'smollm2', 'none' or an existing .gguf file, "
                                f"got '{spec}'")
    model, tok = load_gguf(path)
    return (model.to(device).eval(), tok), {"name": spec, "path": str(path)}


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
        if not self.tau > 0:
            raise KForcingError(f"tau must be > 0, got {self.tau}")
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
    u: torch.Tensor                  # (B, L) uniforms driving every free-running sample
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

    def teacher_samples(self, teacher, order: str, progress: bool = False) -> torch.Tensor:
        if order not in self._teacher_samples:
            self._teacher_samples[order] = _batched(
                lambda p, u: rollout_ar(teacher, p, u, self.cfg.tau, order), self,
                "teacher samples", progress)
        return self._teacher_samples[order]


def _batched(fn, eset: EvalSet, desc: str, progress: bool) -> torch.Tensor:
    bs = eset.cfg.batch_size
    starts = range(0, eset.prompts.shape[0], bs)
    return torch.cat([fn(eset.prompts[s:s + bs], eset.u[s:s + bs])
                      for s in tqdm(starts, desc=desc, disable=not progress, leave=False)])


def build_eval_set(teacher, tokens: TokenFile, cfg: EvalConfig, k_max: int = 1) -> EvalSet:
    """Draw the prompts, the contexts and all uniforms from the seed (same for every method)."""
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
    u = torch.rand(prompts.shape[0], cfg.new_tokens, generator=g, dtype=torch.float64)
    # the same draw as build_match_set's contexts, so the TV contexts are the match contexts
    g_ctx = torch.Generator().manual_seed(10_000 + cfg.seed)
    tv_x = held_out_blocks(tokens, cfg.tv_contexts, cfg.context_len, g_ctx)
    tv_u = torch.rand(tv_x.shape[0], cfg.tv_draws,
                      generator=torch.Generator().manual_seed(30_000 + cfg.seed),
                      dtype=torch.float64)
    return EvalSet(tokens, cfg, prompts.to(device), u.to(device), tv_x.to(device),
                   tv_u.to(device))


def sample_quality(teacher, prompts: torch.Tensor, samples: torch.Tensor, *, tokenizer=None,
                   judge=None, batch_size: int = 16, progress: bool = False) -> dict:
    """Generative perplexity under the teacher, unigram entropy (mean per sample, nats),
    distinct-1/2/3 and, with a tokenizer and a judge, the judge's perplexity of the text."""
    rows = samples.tolist()
    out = {"gen_ppl_teacher": generative_perplexity(teacher, prompts, samples, batch_size),
           "unigram_entropy": sum(map(unigram_entropy, rows)) / len(rows),
           **{f"distinct_{n}": distinct_n(rows, n) for n in (1, 2, 3)},
           "judge_ppl": None}
    if tokenizer is not None and judge is not None:
        out["judge_ppl"] = judge_perplexity(
            decode(tokenizer, samples), *judge, prompts=decode(tokenizer, prompts),
            progress=progress)
    return out


def decode(tokenizer, rows: torch.Tensor) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows.tolist()]


def check_student(student, teacher) -> None:
    ours, theirs = student.model_config, teacher.config
    if ours.vocab_size != theirs.vocab_size:
        raise KForcingError(f"the student has a {ours.vocab_size}-token vocabulary, its teacher "
                            f"{theirs.vocab_size}: mismatched teacher")


def evaluate_teacher(teacher, eset: EvalSet, *, order: str = "vocab", tokenizer=None, judge=None,
                     progress: bool = False) -> dict:
    """The teacher's own samples, scored like the students' (the reference column)."""
    t0 = time.perf_counter()
    samples = eset.teacher_samples(teacher, order, progress)
    out = {"tau": eset.cfg.tau, "cdf_order": order, "n_samples": samples.shape[0],
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
    order = student.config.cdf_order
    was_training = student.training
    student.eval()
    rates = match_rates(student, eset.match_set(teacher, k, order))[f"tau{cfg.tau:g}"]
    tv = first_token_tv(student, teacher, eset.tv_x, eset.tv_u, cfg.tau, progress=progress)
    samples = _batched(lambda p, u: rollout_kforcing(student, p, u, cfg.tau, k), eset,
                       f"k={k} samples", progress)
    ref = eset.teacher_samples(teacher, order, progress)
    differ = torch.cat([samples != ref, torch.ones_like(ref[:, :1], dtype=torch.bool)], 1)
    out = {"k": k, "tau": cfg.tau, "cdf_order": order,
           "first_token_match": rates["first"], "joint_match": rates["joint"],
           "per_position_match": rates["per_pos"], "match_windows": rates["windows"],
           **tv,
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


NOTES = {
    "joint_match": "share of held-out windows whose k student tokens all equal the teacher's "
                   "exact AR rollout for the same uniforms",
    "gen_ppl_teacher": "exp(mean NLL per generated token) under the teacher at temperature 1",
    "unigram_entropy": "entropy (nats) of each sample's token histogram, averaged over samples",
    "distinct_n": "distinct n-grams / all n-grams, pooled over all samples",
    "judge_ppl": "perplexity of the decoded continuation, given the decoded prompt, under the "
                 "judge LM with its own tokenizer",
    "first_token_tv": "mean over contexts of 0.5 sum_i |q_i - p_i|, Monte Carlo with the "
                      "teacher's own inverse-CDF draws on the same uniforms as control variate; "
                      "upward biased by at most first_token_tv_bias_bound in expectation; "
                      "first_token_tv_se = standard error over contexts; "
                      "first_token_tv_coupling_bound = P(student token != teacher token), an "
                      "upper bound on TV",
    "agree_prefix": "mean number of leading tokens of a free-running sample equal to the "
                    "teacher's sample from the same prompt and uniforms",
}


def evaluate(teacher, tokens: TokenFile, runs: list[tuple[str, object, int]], *,
             cfg: EvalConfig | None = None, tokenizer=None, judge=None, progress: bool = False
             ) -> dict:
    """{'config', 'teacher', 'students', 'notes'}: the teacher's own samples and one entry per
    run (label, student, k), all on the same contexts, prompts and uniforms."""
    cfg = cfg or EvalConfig()
    for _, student, k in runs:
        check_k(k, student.config.max_k)
        check_student(student, teacher)
    eset = build_eval_set(teacher, tokens, cfg, max((k for *_, k in runs), default=1))
    order = runs[0][1].config.cdf_order if runs else "vocab"
    result = {"config": asdict(cfg),
              "teacher": evaluate_teacher(teacher, eset, order=order, tokenizer=tokenizer,
                                          judge=judge, progress=progress),
              "students": [], "notes": NOTES}
    for label, student, k in tqdm(runs, desc="students", disable=not progress or len(runs) < 2):
        entry = evaluate_student(student, teacher, tokens, k=k, eset=eset, tokenizer=tokenizer,
                                 judge=judge, progress=progress)
        result["students"].append({"student": label, **entry})
    return result


# -- the report ----------------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def eval_markdown(result: dict) -> str:
    """The eval dict as markdown: fidelity table, sample-quality table, a few samples."""
    t, students = result["teacher"], result["students"]
    lines = ["| student | k | tau | first-token match | joint match | per position | "
             "first-token TV (± s.e., bias ≤) |", "|---|---|---|---|---|---|---|"]
    for s in students:
        per = " / ".join(f"{100 * m:.1f}" for m in s["per_position_match"])
        tv = (f"{_f(s['first_token_tv'], '.3f')} ± {_f(s['first_token_tv_se'], '.3f')} "
              f"(≤ {_f(s['first_token_tv_bias_bound'], '.3f')})")
        lines.append(f"| {s.get('student', '')} | {s['k']} | {s['tau']:g} | "
                     f"{100 * s['first_token_match']:.1f}% | {100 * s['joint_match']:.1f}% | "
                     f"{per} | {tv} |")
    lines += ["", f"Free-running samples: {t['n_samples']} held-out prompts x {t['new_tokens']} "
              f"new tokens, tau {t['tau']:g}, same uniforms for every sampler.", "",
              "| sampler | k | gen PPL (teacher) | judge PPL | unigram entropy (nats) | "
              "distinct-1 / 2 / 3 | agrees with teacher for |", "|---|---|---|---|---|---|---|"]

    def quality(name: str, k, e: dict, agree: str) -> str:
        dist = " / ".join(f"{e[f'distinct_{n}']:.3f}" for n in (1, 2, 3))
        return (f"| {name} | {k} | {_f(e['gen_ppl_teacher'], '.1f')} | "
                f"{_f(e['judge_ppl'], '.1f')} | {e['unigram_entropy']:.3f} | {dist} | {agree} |")

    lines.append(quality("teacher (AR)", 1, t, "–"))
    for s in students:
        lines.append(quality(s.get("student", "student"), s["k"], s,
                             f"{s['agree_prefix']:.1f} tokens"))
    for s in students:
        for i, ex in enumerate(s.get("samples", [])[:2]):
            lines += ["", f"**{s.get('student', 'student')}, k={s['k']}, sample {i + 1}**", "",
                      f"> prompt: {_oneline(ex['prompt'])}", ">",
                      f"> teacher: {_oneline(ex['teacher'])}", ">",
                      f"> student: {_oneline(ex['student'])}"]
    return "\n".join(lines) + "\n"


def _oneline(text: str) -> str:
    return " ".join(text.split())
