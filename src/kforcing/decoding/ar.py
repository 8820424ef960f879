"""Plain autoregressive decoding with the KV cache: one forward pass per new token.

Token j of row b (j = 0 is the first new token) is sampled with noise index j of row b's
stream (kforcing.core.noise), so a row's text depends only on its prompt and its seed, and
lossless decoding, which spends the same noise, reproduces it token for token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.model import CACHE_ROUND, Transformer
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, sample
from kforcing.decoding.common import (
    GenerationResult,
    OnTokens,
    Streamer,
    check_prompts,
    cut_at_eos,
    noise_for,
    prefill,
    sync_fn,
)
from kforcing.errors import KForcingError


@torch.inference_mode()
def generate_ar(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
                sampling: SamplingConfig | None = None, seed: int = 0,
                noise: NoiseStream | None = None, eos_id: int | None = None,
                stop_at_eos: bool = True, frequency_penalty: float = 0.0,
                cache: KVCache | None = None, on_tokens: OnTokens | None = None,
                compiled: bool | None = None) -> GenerationResult:
    """prompts (B lists of token ids) -> B continuations of up to max_new_tokens tokens.

    noise: one seed per row (default rows seeded seed, seed + 1, ...). frequency_penalty: each
    token's logit is lowered by penalty x (times that row has generated it so far). on_tokens:
    streaming callback (decoding.common.OnTokens). compiled: decode through the model's
    compiled static step (Transformer.compile_decode; True compiles it now if needed), False
    eagerly; None (default) through the compiled step when the model has one."""
    cfg = model.config
    sampling = sampling or SamplingConfig()
    check_prompts(prompts, max_new_tokens, cfg.max_seq_len, cfg.vocab_size)
    if frequency_penalty != frequency_penalty:      # nan
        raise KForcingError(f"frequency_penalty must be a number, got {frequency_penalty}")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    compiled_step = _step_fn(model, compiled)
    if cache is None:
        need = P + max_new_tokens
        if compiled_step is not None:   # rounded up: fewer shapes for the compiled graph
            need = min(cfg.max_seq_len, -(-need // CACHE_ROUND) * CACHE_ROUND)
        cache = KVCache.for_model(model, B, max_len=need)
    cache.reset()
    device = cache.device
    stream = noise_for(noise, seed, B, device)
    eos = cfg.eos_id if eos_id is None else eos_id
    sync = sync_fn(device)
    streamer = Streamer(on_tokens, B, max_new_tokens, eos if stop_at_eos else None)

    t0 = time.perf_counter()
    pre = prefill(model, cache, prompts)
    sync()
    t1 = time.perf_counter()
    logits, pos = pre.logits, pre.next_pos
    counts = torch.zeros(B, cfg.vocab_size, device=device) if frequency_penalty else None
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    noise_at = _token_noises(stream, sampling, B, max_new_tokens, cfg.vocab_size, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_stops = stop_at_eos and eos is not None
    passes, steps = 1, 0
    for step in range(max_new_tokens):
        if counts is not None:
            logits = logits.float() - frequency_penalty * counts
        tok = sample(logits, noise_at(step), sampling)                         # (B,)
        out[:, step] = tok
        steps = step + 1
        if counts is not None:
            counts.scatter_add_(1, tok[:, None], torch.ones(B, 1, device=device))
        if on_tokens is not None:
            # the streamer closes a row exactly when it is done (EOS, the callback's stop), and
            # knows it without reading a tensor
            streamer.push(tok[:, None])
            if streamer.all_closed:
                break
        elif eos_stops:
            done |= tok == eos
            if bool(done.all()):          # a host sync: only when a row can stop early
                break
        if step + 1 == max_new_tokens:
            break
        if compiled_step is None:
            logits = model(tok[:, None], input_pos=pos[:, None], cache=cache)[:, -1]
        else:
            logits = compiled_step(tok, pos, cache)
        pos = pos + 1
        passes += 1
    sync()
    t2 = time.perf_counter()
    rows, finished = cut_at_eos(out[:, :steps].tolist(), eos if stop_at_eos else None)
    return GenerationResult(streamer.cut(rows), finished, passes, t1 - t0, t2 - t1)


def _step_fn(model: Transformer, compiled: bool | None
             ) -> Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor] | None:
    """The compiled static step as (tok (B,), pos (B,), cache) -> logits (B, V), or None for
    the eager forward."""
    if compiled is False or (compiled is None and model.compiled_step is None):
        return None
    if model.compiled_step is None:
        model.compile_decode()
    return lambda tok, pos, cache: model.compiled_pass(tok[:, None], pos[:, None], cache)[:, -1]


def _token_noises(stream: NoiseStream, sampling: SamplingConfig, B: int, n: int, V: int,
                  device: torch.device) -> Callable[[int], torch.Tensor | None]:
    """step j -> the (B[, V]) noise of token j of every row (token_noise at index j): all n
    uniforms in one call up front, one Gumbel vector per step into one reused buffer (each is
    used before the next step draws), nothing when greedy (argmax ignores the noise)."""
    if sampling.greedy or n == 0:
        return lambda j: None
    index = torch.arange(n, device=device).expand(B, n)                       # (B, n)
    if sampling.coupling == "gumbel":
        buffer = torch.empty(B, 1, V, device=device)
        return lambda j: stream.gumbel(index[:, j:j + 1], V, out=buffer)[:, 0]
    uniforms = stream.uniforms(index)                                         # (B, n)
    return lambda j: uniforms[:, j]
