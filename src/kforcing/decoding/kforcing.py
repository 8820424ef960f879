"""K-Forcing decoding (docs/METHOD.md, "KV-cache decoding"): k new tokens per forward pass.

The first pass reads the prompt + the window's noise tokens, every later pass the k tokens just
emitted + fresh noise tokens; noise K/V never stay in the cache. The window that starts at new
token n reads the uniforms of noise indices n .. n + k - 1, the indices AR decoding spends on the
same tokens, so a student that equals the teacher's sampler reproduces AR sampling exactly.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.common import (
    GenerationResult,
    OnTokens,
    Streamer,
    check_prompts,
    cut_at_eos,
    left_pad,
    noise_for,
    sync_fn,
)
from kforcing.errors import KForcingError
from kforcing.students.pushforward import check_k, check_tau


def student_sampling(student, sampling: SamplingConfig | None, temperature: float | None
                     ) -> SamplingConfig:
    """The SamplingConfig a PushForward student decodes with (default: temperature 1 in the
    student's CDF order); refuses, in one line, what its networks cannot honour."""
    order = student.config.cdf_order
    if sampling is None:
        sampling = SamplingConfig(temperature=1.0 if temperature is None else temperature,
                                  cdf_order=order)
    elif temperature is not None:
        sampling = dataclasses.replace(sampling, temperature=temperature)
    if sampling.coupling != "inverse-cdf":
        raise KForcingError(f"coupling '{sampling.coupling}' cannot be honoured by a PushForward "
                            "student: its networks map uniforms through the inverse CDF "
                            "(use coupling 'inverse-cdf')")
    if sampling.top_k:
        raise KForcingError(f"top_k={sampling.top_k} cannot be honoured by a K-Forcing student "
                            "(it samples its own distribution, unfiltered): drop top_k, or use "
                            "mode 'lossless' or 'ar' (the teacher samples)")
    if sampling.top_p < 1.0:
        raise KForcingError(f"top_p={sampling.top_p} cannot be honoured by a K-Forcing student "
                            "(it samples its own distribution, unfiltered): drop top_p, or use "
                            "mode 'lossless' or 'ar' (the teacher samples)")
    if sampling.cdf_order != order:
        raise KForcingError(f"cdf_order '{sampling.cdf_order}' cannot be honoured: this student "
                            f"was trained with cdf_order '{order}'")
    check_tau(sampling.temperature)
    warn_outside_trained_tau(student, sampling.temperature)
    return sampling


def trained_tau(student) -> tuple[float, float] | None:
    """The temperatures a student was trained at: `student.trained_tau` (set by whoever knows
    them, e.g. the loader from the run's config) or its config's tau_min / tau_max."""
    trained = getattr(student, "trained_tau", None)
    if trained is None and hasattr(student.config, "tau_min"):
        trained = (student.config.tau_min, student.config.tau_max)
    return trained


def warn_outside_trained_tau(student, tau: float) -> None:
    """One warning (on stderr) when tau lies outside the temperatures the student was trained
    at: its samples there are extrapolation."""
    trained = trained_tau(student)
    if trained is None or tau == 0:
        return
    lo, hi = trained
    if not lo <= tau <= hi:
        warnings.warn(f"temperature {tau:g} is outside the range this student was trained at "
                      f"[{lo:g}, {hi:g}]: expect samples further from its teacher's",
                      stacklevel=3)


@torch.inference_mode()
def generate_kforcing(student, prompts: list[list[int]], max_new_tokens: int, *,
                      k: int | None = None, sampling: SamplingConfig | None = None,
                      temperature: float | None = None, seed: int = 0,
                      noise: NoiseStream | None = None, eos_id: int | None = None,
                      stop_at_eos: bool = True, frequency_penalty: float = 0.0,
                      on_tokens: OnTokens | None = None) -> GenerationResult:
    """Exactly k new tokens per pass from a PushForward student (k defaults to its max_k).

    sampling / temperature: the student's temperature tau (top-k, top-p, another CDF order or
    coupling are refused). noise: one seed per row (default rows seeded seed, seed + 1, ...).
    frequency_penalty: subtracted per earlier occurrence from every output's logits (counts are
    updated after each pass). on_tokens: streaming callback (decoding.common.OnTokens)."""
    scfg, mcfg = student.config, student.model_config
    k = scfg.max_k if k is None else k
    check_k(k, scfg.max_k)
    sampling = student_sampling(student, sampling, temperature)
    check_prompts(prompts, max_new_tokens, mcfg.max_seq_len, mcfg.vocab_size, reserved=k,
                  why=f"k={k} slots the K-Forcing window needs")
    B = len(prompts)
    ids, valid, pos = left_pad(prompts, next(student.parameters()).device)
    device = ids.device
    stream = noise_for(noise, seed, B, device)
    cache = KVCache.for_model(student.context_model, B,
                              max_len=ids.shape[1] + max_new_tokens + 2 * k)
    eos = mcfg.eos_id if eos_id is None else eos_id
    tau = torch.full((B,), float(sampling.temperature), dtype=torch.float64, device=device)
    counts = torch.zeros(B, mcfg.vocab_size, device=device) if frequency_penalty else None
    ar_k = torch.arange(k, device=device)
    sync = sync_fn(device)
    streamer = Streamer(on_tokens, B, max_new_tokens, eos if stop_at_eos else None)

    t0 = time.perf_counter()
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    real, real_pos, passes = ids, pos, 0
    cache.mark_padding(valid)
    while out.shape[1] < max_new_tokens:
        u = stream.uniforms((out.shape[1] + ar_k).expand(B, k))                  # (B, k)
        penalty = counts * frequency_penalty if counts is not None else None
        toks = student.window_pass(cache, real, real_pos, u, tau, penalty).tokens[:, 0]  # (B,k)
        passes += 1
        out = torch.cat([out, toks], dim=1)
        if counts is not None:
            counts.scatter_add_(1, toks, torch.ones_like(toks, dtype=counts.dtype))
        if stop_at_eos and eos is not None:
            done |= (toks == eos).any(1)
        if (stop := streamer.push(toks)) is not None:
            done |= stop
        # reading `done` is a host sync: only when a row can actually stop early
        if (stop is not None or (stop_at_eos and eos is not None)) and bool(done.all()):
            break
        real, real_pos = toks, real_pos[:, -1:] + torch.arange(1, k + 1, device=device)
    sync()
    t1 = time.perf_counter()
    rows, finished = cut_at_eos(out[:, :max_new_tokens].tolist(), eos if stop_at_eos else None)
    return GenerationResult(streamer.cut(rows), finished, passes, 0.0, t1 - t0, extra={"k": k})
