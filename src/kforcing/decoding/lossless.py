"""Lossless mode: the K-Forcing student proposes, the teacher verifies with the same noise.

Every sequence owns one stream of noise (kforcing.core.noise), consumed exactly as plain AR
sampling consumes it: token j of row b is sample(teacher(context), noise index j of row b). The
student maps the same uniforms to its proposals, so one teacher pass over a proposal says which
proposed tokens the teacher itself would have drawn. Output is token-identical to AR sampling
from the teacher with the same SamplingConfig and noise.

One loop serves both weight layouts. Each pass reads `real` tokens (the token the teacher
emitted last, plus the unverified proposals of the previous pass) and k noise tokens (the next
proposals). The teacher's logits at the real tokens verify the previous proposals and the first
new one:

- `teacher-preserving`: the context stream *is* the teacher, so these logits come out of the
  same pass that proposes the next window (fused verification, one pass per step);
- `shared`: a separate teacher pass over the same real tokens, with its own cache (two passes).

Rows accept different numbers of tokens. Instead of per-row cache lengths, every pass appends
the same number of slots to every row. Slots of rejected proposals and left padding are then
masked out (KVCache.valid), and each row keeps its own RoPE positions. The first rejected token
is replaced by the teacher's own token, so every pass emits at least one token per row.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, sample, token_noise
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


@torch.inference_mode()
def generate_lossless(student, prompts: list[list[int]], max_new_tokens: int, *,
                      k: int | None = None, temperature: float | None = None,
                      sampling: SamplingConfig | None = None, teacher=None,
                      proposal_tau: float | None = None, seed: int = 0,
                      noise: NoiseStream | None = None, eos_id: int | None = None,
                      stop_at_eos: bool = True, on_tokens: OnTokens | None = None
                      ) -> GenerationResult:
    """Sample from the teacher exactly, k proposals per step from the student.

    sampling: the teacher's sampler (temperature, top-k, top-p; the CDF order defaults to the
    student's, which is what its proposals imitate); temperature: a shortcut for it. teacher:
    needed for the `shared` layout; a teacher-preserving student already holds it. proposal_tau:
    the temperature the student proposes at (default: the sampling temperature; greedy decoding
    proposes at 0.7). noise: one seed per row (default rows seeded seed, seed + 1, ...).
    extra: tokens_per_pass (tokens a row gains per teacher pass, mean over active rows),
    accepted_per_pass (proposals accepted per teacher pass), passes_per_token,
    teacher_passes, fused. on_tokens: streaming callback (decoding.common.OnTokens).
    """
    scfg, mcfg = student.config, student.model_config
    k = scfg.max_k if k is None else k
    check_k(k, scfg.max_k)
    if sampling is None:
        sampling = SamplingConfig(temperature=1.0 if temperature is None else temperature,
                                  cdf_order=scfg.cdf_order)
    elif temperature is not None:
        sampling = dataclasses.replace(sampling, temperature=temperature)
    if sampling.coupling != "inverse-cdf":
        raise KForcingError(f"coupling '{sampling.coupling}' cannot be verified against a "
                            "PushForward student's proposals: they imitate inverse-CDF sampling "
                            "(use coupling 'inverse-cdf')")
    tau_p = proposal_tau if proposal_tau is not None else (
        sampling.temperature if not sampling.greedy else 0.7)
    check_tau(tau_p)
    fused = student.teacher is not None
    if fused:
        if teacher is not None and teacher is not student.teacher:
            raise KForcingError("a teacher-preserving student verifies with its own teacher; "
                                "do not pass another one")
        teacher = student.teacher
    elif teacher is None:
        raise KForcingError("lossless mode with a shared-layout student needs its teacher "
                            "(teacher=..., e.g. teacher_of(student, student_dir))")
    if teacher.config.vocab_size != mcfg.vocab_size:
        raise KForcingError(f"teacher vocabulary {teacher.config.vocab_size} != student "
                            f"vocabulary {mcfg.vocab_size}: not this student's teacher")
    # positions reach prompt + max_new_tokens + 2k (proposals run ahead of the emitted tokens)
    check_prompts(prompts, max_new_tokens, mcfg.max_seq_len, mcfg.vocab_size, reserved=2 * k,
                  why=f"2k={2 * k} slots the lossless window needs")

    B = len(prompts)
    device = next(student.parameters()).device
    ids, valid, pos = left_pad(prompts, device)
    run = _Run(
        student=student, teacher=teacher, sampling=sampling, k=k, max_new=max_new_tokens,
        noise=noise_for(noise, seed, B, device),
        tau=torch.full((B,), float(tau_p), dtype=torch.float64, device=device),
        eos=(mcfg.eos_id if eos_id is None else eos_id) if stop_at_eos else None,
        out=torch.zeros(B, max_new_tokens + k + 2, dtype=torch.long, device=device),
        n=torch.zeros(B, dtype=torch.long, device=device),
        done=torch.zeros(B, dtype=torch.bool, device=device),
        first_pos=pos[:, -1] + 1,
        streamer=Streamer(on_tokens, B, max_new_tokens,
                          (mcfg.eos_id if eos_id is None else eos_id) if stop_at_eos else None))
    sync = sync_fn(device)
    t0 = time.perf_counter()
    if max_new_tokens > 0:
        (_fused_loop if fused else _two_pass_loop)(run, ids, valid, pos)
    sync()
    t1 = time.perf_counter()
    rows_out, finished = cut_at_eos(
        [r[:int(c)][:max_new_tokens] for r, c in zip(run.out.tolist(), run.n.tolist(),
                                                      strict=True)], run.eos)
    extra = {"mode": "lossless", "k": k, "fused": fused, "teacher_passes": run.passes,
             "tokens_per_pass": run.gained / run.active_rows if run.active_rows else 0.0,
             "accepted_per_pass": run.accepted / run.active_rows if run.active_rows else 0.0,
             "passes_per_token": run.active_rows / run.gained if run.gained else 0.0}
    passes = run.passes * (1 if fused else 2)
    return GenerationResult(run.streamer.cut(rows_out), finished, passes, 0.0, t1 - t0,
                            extra=extra)


@dataclass
class _Run:
    """What both loops share: the noise stream, the output buffer and the counters."""
    student: object
    teacher: object
    sampling: SamplingConfig
    k: int
    max_new: int
    noise: NoiseStream       # row b's token j is sampled with noise index j
    tau: torch.Tensor        # (B,) proposal temperature
    eos: int | None
    out: torch.Tensor        # (B, max_new + k + 2); the last column takes discarded writes
    n: torch.Tensor          # (B,) tokens emitted per row
    done: torch.Tensor       # (B,) row emitted EOS
    first_pos: torch.Tensor  # (B,) RoPE position of new token 0
    streamer: Streamer       # the on_tokens callback, if any
    passes: int = 0
    gained: int = 0
    accepted: int = 0
    active_rows: int = 0

    def active(self) -> torch.Tensor:
        return ~self.done & (self.n < self.max_new)

    def u(self, offset: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) uniforms of tokens offset .. offset + width - 1 of each row."""
        return self.noise.uniforms(offset[:, None] + torch.arange(width, device=offset.device))

    def teacher_tokens(self, logits: torch.Tensor, last: torch.Tensor, width: int) -> torch.Tensor:
        """Teacher tokens n .. n + width - 1: logits (B, R, V) read at slots last .. last + width
        - 1 (clamped to R - 1), each with its own noise."""
        B, R, V = logits.shape
        slot = (last[:, None] + torch.arange(width, device=logits.device)).clamp(max=R - 1)
        rows = torch.arange(B, device=logits.device)[:, None]
        index = self.n[:, None] + torch.arange(width, device=logits.device)
        return sample(logits[rows, slot], token_noise(self.noise, index, self.sampling, V),
                      self.sampling)

    def emit(self, t: torch.Tensor, a: torch.Tensor, active: torch.Tensor) -> None:
        """Rows gain t[:, :a + 1] (active rows only)."""
        ar = torch.arange(t.shape[1], device=t.device)[None]
        keep = (ar <= a[:, None]) & active[:, None]
        dump = self.out.shape[1] - 1
        self.out.scatter_(1, torch.where(keep, self.n[:, None] + ar, dump).clamp(max=dump), t)
        if self.eos is not None:
            self.done |= ((t == self.eos) & keep).any(1)
        self.gained += int((a + 1)[active].sum())
        self.accepted += int(a[active].sum())
        self.active_rows += int(active.sum())
        self.n = self.n + torch.where(active, a + 1, 0)
        stop = self.streamer.push(t, torch.where(active, a + 1, 0))
        if stop is not None:
            self.done |= stop


def _leading(ok: torch.Tensor) -> torch.Tensor:
    return ok.long().cumprod(1).sum(1)


def _invalidate(cache: KVCache, start: int, rejected: torch.Tensor) -> None:
    """Mask out slots start + j where rejected[:, j] (a per-row rollback)."""
    cache.valid[:, start:start + rejected.shape[1]] &= ~rejected
    cache.has_padding = cache.has_padding or bool(rejected.any())


def _fused_loop(run: _Run, ids: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> None:
    """Teacher-preserving layout: one pass reads real = [teacher's last token, unverified
    proposals] and k noise tokens; the teacher's logits at the real tokens verify the previous
    proposals and the first new one."""
    k, student = run.k, run.student
    B, device = ids.shape[0], ids.device
    cache = KVCache.for_model(student.context_model, B,
                              max_len=ids.shape[1] + k * run.max_new + 2 * k)
    ar_k = torch.arange(k, device=device)
    rows = torch.arange(B, device=device)[:, None]
    m = torch.zeros(B, dtype=torch.long, device=device)     # unverified proposals ending `real`
    real, real_pos, real_valid = ids, pos, valid
    while bool((active := run.active()).any()):
        R, start = real.shape[1], cache.length
        cache.mark_padding(real_valid)
        win = student.window_pass(cache, real, real_pos, run.u(run.n + m, k), run.tau,
                                  context_logits=True)
        z = win.tokens[:, 0]                                                    # (B, k)
        run.passes += 1
        # teacher token j (row token n + j) is read at real slot R - 1 - m + j, for j <= m
        t = run.teacher_tokens(win.context_logits, R - 1 - m, k)
        cand = torch.cat([real, z], 1)[rows, R - m[:, None] + ar_k]   # proposals, then new ones
        a = _leading((cand == t) & (ar_k[None] <= m[:, None]))        # in [0, m + 1]
        a_emit = torch.minimum(a, m)
        full = (a == m + 1) & active      # every proposal and the new window's first agreed
        run.emit(t, a_emit, active)
        j = torch.arange(R, device=device)[None]
        _invalidate(cache, start, j >= R - m[:, None] + a_emit[:, None])
        # next: the whole new window (its first token is verified) when everything agreed,
        # else the teacher's token alone, left-padded to k slots
        last = t.gather(1, a_emit[:, None])
        pad = torch.cat([torch.zeros(B, k - 1, dtype=torch.long, device=device), last], 1)
        real = torch.where(full[:, None], z, pad)
        real_valid = (full[:, None] | (ar_k[None] == k - 1)) & active[:, None]
        base = run.first_pos + run.n - 1                  # position of the last emitted token
        real_pos = (base[:, None] + torch.where(full[:, None], ar_k, ar_k - (k - 1))).clamp(min=0)
        m = torch.where(full, k - 1, 0)


def _two_pass_loop(run: _Run, ids: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> None:
    """Shared layout: the student proposes z from its own cache, then one teacher pass over
    [teacher's pending tokens, z] verifies all k proposals (plus a bonus token when all agree)."""
    k, student, teacher = run.k, run.student, run.teacher
    B, device = ids.shape[0], ids.device
    cap = ids.shape[1] + (k + 1) * run.max_new + 2 * k
    s_cache = KVCache.for_model(student.context_model, B, max_len=cap)
    t_cache = KVCache.for_model(teacher, B, max_len=cap)
    ar_k = torch.arange(k, device=device)
    ar_k1 = torch.arange(k + 1, device=device)
    s_real, s_pos, s_valid = ids, pos, valid               # tokens the student has not read
    t_real, t_pos, t_valid = ids, pos, valid               # tokens the teacher has not read
    while bool((active := run.active()).any()):
        s_cache.mark_padding(s_valid)
        z = student.window_pass(s_cache, s_real, s_pos, run.u(run.n, k), run.tau).tokens[:, 0]
        Rt, start = t_real.shape[1], t_cache.length
        z_pos = t_pos[:, -1:] + 1 + ar_k
        t_cache.mark_padding(torch.cat([t_valid, active[:, None].expand(B, k)], 1))
        logits = teacher(torch.cat([t_real, z], 1), input_pos=torch.cat([t_pos, z_pos], 1),
                         cache=t_cache)
        run.passes += 1
        t = run.teacher_tokens(logits, torch.full((B,), Rt - 1, device=device), k + 1)
        a = _leading(z == t[:, :k])                                   # in [0, k]
        run.emit(t, a, active)
        _invalidate(t_cache, start + Rt, ar_k[None] >= a[:, None])
        base = run.first_pos + run.n - 1                  # position of the last emitted token
        # the student reads everything emitted this pass, right-aligned in k + 1 slots
        src = (ar_k1[None] - k + a[:, None]).clamp(min=0)
        s_real = t.gather(1, src)
        s_valid = (ar_k1[None] >= k - a[:, None]) & active[:, None]
        s_pos = (base[:, None] - k + ar_k1).clamp(min=0)
        # the teacher has read the accepted proposals; only its own last token is new
        t_real, t_pos, t_valid = t.gather(1, a[:, None]), base[:, None], active[:, None]
