"""Batched generation with the KV cache: prefill the (left-padded) prompts, then decode.

Every decoder shares `prefill` and the cache protocol of model.forward; the K-Forcing and
lossless decoders add their own step functions on top of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kforcing.errors import KForcingError
from kforcing.core.kv_cache import KVCache
from kforcing.core.model import Transformer
from kforcing.core.sampling import SamplingConfig, make_generator, sample, uniforms


@dataclass
class GenerationResult:
    tokens: list[list[int]]          # new tokens per row, cut after EOS (EOS itself kept)
    finished: list[bool]             # row stopped at EOS
    forward_passes: int
    prefill_seconds: float
    decode_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Prefill:
    logits: torch.Tensor     # (B, V) next-token logits at each row's last prompt token
    next_pos: torch.Tensor   # (B,) RoPE position of each row's next token


def check_prompts(prompts: list[list[int]], max_new_tokens: int, context: int,
                  vocab_size: int) -> None:
    if not prompts:
        raise KForcingError("no prompts given")
    if max_new_tokens < 0:
        raise KForcingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise KForcingError(f"prompt {i} is empty: give at least one token")
        if len(p) + max_new_tokens > context:
            raise KForcingError(
                f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens that exceeds "
                f"the model's context of {context} tokens")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise KForcingError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                f"of {vocab_size} (mismatched tokenizer?)")


def prefill(model: Transformer, cache: KVCache, prompts: list[list[int]]) -> Prefill:
    """Left-pad the prompts into one batch and run them through the model into the cache."""
    ids, valid, pos = left_pad(prompts, cache.k.device)
    cache.mark_padding(valid)
    logits = model(ids, input_pos=pos, cache=cache, last_only=True)[:, -1]
    return Prefill(logits=logits, next_pos=pos[:, -1] + 1)


@torch.inference_mode()
def generate_ar(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
                sampling: SamplingConfig | None = None, seed: int | torch.Generator | None = 0,
                eos_id: int | None = None, stop_at_eos: bool = True,
                cache: KVCache | None = None) -> GenerationResult:
    """Plain autoregressive decoding: one forward pass per new token, one uniform per token."""
    cfg = model.config
    sampling = sampling or SamplingConfig()
    check_prompts(prompts, max_new_tokens, cfg.max_seq_len, cfg.vocab_size)
    B = len(prompts)
    P = max(len(p) for p in prompts)
    if cache is None:
        cache = KVCache.for_model(model, B, max_len=P + max_new_tokens)
    cache.reset()
    gen = make_generator(seed)
    eos = cfg.eos_id if eos_id is None else eos_id
    sync = _sync_fn(cache.k.device)

    t0 = time.perf_counter()
    pre = prefill(model, cache, prompts)
    sync()
    t1 = time.perf_counter()
    logits, pos = pre.logits, pre.next_pos
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    passes, steps = 1, 0
    for step in range(max_new_tokens):
        u = uniforms((B,), gen).to(logits.device)
        tok = sample(logits, u, sampling)                              # (B,)
        out[:, step] = tok
        steps = step + 1
        if stop_at_eos and eos is not None:
            done |= tok == eos
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        logits = model(tok[:, None], input_pos=pos[:, None], cache=cache)[:, -1]
        pos = pos + 1
        passes += 1
    sync()
    t2 = time.perf_counter()
    rows, finished = _cut_at_eos(out[:, :steps].tolist(), eos if stop_at_eos else None)
    return GenerationResult(rows, finished, passes, t1 - t0, t2 - t1)


def _cut_at_eos(rows: list[list[int]], eos: int | None) -> tuple[list[list[int]], list[bool]]:
    if eos is None:
        return rows, [False] * len(rows)
    cut, finished = [], []
    for r in rows:
        if eos in r:
            cut.append(r[:r.index(eos) + 1])
            finished.append(True)
        else:
            cut.append(r)
            finished.append(False)
    return cut, finished


def _sync_fn(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, valid, pos), each (B, P): prompts right-aligned, per-row RoPE positions from 0."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    pad = (~valid).sum(1)
    pos = (torch.arange(P, device=device)[None] - pad[:, None]).clamp_(min=0)
    return ids, valid, pos


@torch.inference_mode()
def generate_kforcing(student, prompts: list[list[int]], max_new_tokens: int, *,
                      k: int | None = None, temperature: float = 1.0,
                      seed: int | torch.Generator | None = 0, eos_id: int | None = None,
                      stop_at_eos: bool = True, frequency_penalty: float = 0.0
                      ) -> GenerationResult:
    """K-Forcing decoding (METHOD.md section 5): the first pass reads the prompt + k noise
    tokens, every later pass the k tokens just emitted + k fresh noise tokens; noise K/V never
    stay in the cache. Exactly k new tokens per pass."""
    from kforcing.students.pushforward import check_k, check_tau

    scfg, mcfg = student.config, student.model_config
    k = scfg.max_k if k is None else k
    check_k(k, scfg.max_k)
    check_tau(temperature)
    check_prompts(prompts, max_new_tokens, mcfg.max_seq_len - k, mcfg.vocab_size)
    B = len(prompts)
    ids, valid, pos = left_pad(prompts, next(student.parameters()).device)
    device = ids.device
    ctx = student.context_model
    cache = KVCache.for_model(ctx, B, max_len=ids.shape[1] + max_new_tokens + 2 * k)
    gen = make_generator(seed)
    eos = mcfg.eos_id if eos_id is None else eos_id
    tau = torch.full((B,), float(temperature), dtype=torch.float64, device=device)
    counts = torch.zeros(B, mcfg.vocab_size, device=device) if frequency_penalty else None
    sync = _sync_fn(device)

    t0 = time.perf_counter()
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    real, real_pos, passes = ids, pos, 0
    cache.mark_padding(valid)
    while out.shape[1] < max_new_tokens:
        u = uniforms((B, k), gen).to(device)
        penalty = counts * frequency_penalty if counts is not None else None
        toks = student.window_pass(cache, real, real_pos, u, tau, penalty).tokens[:, 0]  # (B,k)
        passes += 1
        out = torch.cat([out, toks], dim=1)
        if counts is not None:
            counts.scatter_add_(1, toks, torch.ones_like(toks, dtype=counts.dtype))
        if stop_at_eos and eos is not None:
            done |= (toks == eos).any(1)
            if bool(done.all()):
                break
        real, real_pos = toks, real_pos[:, -1:] + torch.arange(1, k + 1, device=device)
    sync()
    t1 = time.perf_counter()
    rows, finished = _cut_at_eos(out[:, :max_new_tokens].tolist(), eos if stop_at_eos else None)
    return GenerationResult(rows, finished, passes, 0.0, t1 - t0, extra={"k": k})


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, k: int | None = None,
             mode: str = "kforcing", **kw) -> GenerationResult:
    """Entry point for every decoder: a plain Transformer decodes AR; a K-Forcing student
    decodes k tokens per pass (k defaults to its max_k), or with mode="lossless" proposes k
    tokens that its teacher verifies (output distributed exactly as the teacher's)."""
    from kforcing.students.pushforward import PushForward

    if mode not in ("kforcing", "lossless"):
        raise KForcingError(f"mode must be 'kforcing' or 'lossless', got '{mode}'")
    if mode == "lossless":
        if not isinstance(model, PushForward):
            raise KForcingError("lossless mode needs a K-Forcing student (it proposes, its "
                                "teacher verifies)")
        from kforcing.decoding.lossless import generate_lossless
        if kw.pop("frequency_penalty", 0.0):
            raise KForcingError("lossless mode samples the teacher's exact distribution: a "
                                "frequency penalty would change it")
        return generate_lossless(model, prompts, max_new_tokens, k=k, **kw)
    if isinstance(model, PushForward):
        sampling = kw.pop("sampling", None)
        if sampling is not None:
            kw.setdefault("temperature", sampling.temperature)
        return generate_kforcing(model, prompts, max_new_tokens, k=k, **kw)
    if k not in (None, 1):
        raise KForcingError(f"k={k} needs a K-Forcing student; this is a plain AR model")
    return generate_ar(model, prompts, max_new_tokens, **kw)

