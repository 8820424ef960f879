"""The K-Forcing student: a teacher backbone plus a noise encoder, mapping (context, u_1..u_k, tau)
to the next k tokens in one pass (docs/METHOD.md sections 2, 5).

Two weight layouts share every code path:
- `shared` (the paper): one fine-tuned backbone reads context and noise tokens;
- `teacher-preserving`: a frozen teacher reads the context (its KV cache is exactly the
  teacher's), a trainable copy reads only the noise tokens.
Two output heads:
- `argmax`: y_i = argmax of the output at noise token i (k noise tokens);
- `inverse-cdf`: y_i = InvCDF(q_i, u_i) with q_1 read at the last real token and q_i at noise
  token i-1, which has seen u_1..u_{i-1} (k-1 noise tokens).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from kforcing.core.config import check_types
from kforcing.core.kv_cache import KVCache
from kforcing.core.masks import staircase
from kforcing.core.model import RMSNorm, Transformer, causal_mask
from kforcing.core.sampling import CDF_ORDERS, inverse_cdf
from kforcing.errors import KForcingError
from kforcing.students.targets import tempered_probs

LAYOUTS = ("shared", "teacher-preserving")
HEADS = ("argmax", "inverse-cdf")


@dataclass
class StudentConfig:
    max_k: int = 4
    layout: str = "shared"
    head: str = "argmax"
    cdf_order: str = "vocab"
    noise_min_freq: float = 1.0       # cycles per unit of u (geometric spacing)
    noise_max_freq: float = 1e4
    noise_blocks: int = 2             # residual MLP blocks after the projection

    def __post_init__(self) -> None:
        check_types(self)
        if self.max_k < 1:
            raise KForcingError(f"max_k must be >= 1, got {self.max_k}")
        if self.layout not in LAYOUTS:
            raise KForcingError(f"layout must be one of {LAYOUTS}, got '{self.layout}'")
        if self.head not in HEADS:
            raise KForcingError(f"head must be one of {HEADS}, got '{self.head}'")
        if self.cdf_order not in CDF_ORDERS:
            raise KForcingError(f"cdf_order must be one of {CDF_ORDERS}, got '{self.cdf_order}'")

    def n_noise(self, k: int) -> int:
        """Noise tokens a k-token window needs."""
        return k if self.head == "argmax" else k - 1


def check_k(k: int, max_k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise KForcingError(f"k must be a positive integer, got {k!r}")
    if k > max_k:
        raise KForcingError(f"k={k} exceeds this checkpoint's max_k={max_k}")


def check_tau(tau: float | torch.Tensor) -> None:
    t = torch.as_tensor(tau, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise KForcingError(f"temperature tau must be a finite number > 0, got "
                            f"{t[~torch.isfinite(t)].flatten()[0].item()}")
    if (t <= 0).any():
        raise KForcingError("temperature tau must be > 0 for K-Forcing (the student maps noise "
                            "to samples; greedy decoding has no noise to map)")


def sinusoidal(x: torch.Tensor, width: int, min_freq: float, max_freq: float) -> torch.Tensor:
    """x (...,) float64 -> (..., width) sin/cos features at geometric frequencies, in float64 so
    that nearby uniforms (CDF intervals can be 1e-5 wide) stay distinguishable."""
    half = width // 2
    freqs = torch.logspace(math.log10(min_freq), math.log10(max_freq), half,
                           dtype=torch.float64, device=x.device)
    angles = 2 * math.pi * x.double()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class NoiseEncoder(nn.Module):
    """(u, tau) -> the input vector of a noise token."""

    def __init__(self, dim: int, cfg: StudentConfig, eps: float = 1e-5):
        super().__init__()
        self.dim, self.cfg = dim, cfg
        self.proj = nn.Linear(2 * dim, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(RMSNorm(dim, eps), nn.Linear(dim, 2 * dim), nn.SiLU(),
                          nn.Linear(2 * dim, dim)) for _ in range(cfg.noise_blocks))
        self.out_norm = RMSNorm(dim, eps)

    def forward(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """u (..., n) in [0, 1), tau broadcastable to u -> (..., n, dim)."""
        c = self.cfg
        feats = torch.cat([sinusoidal(u, self.dim, c.noise_min_freq, c.noise_max_freq),
                           sinusoidal(tau.expand_as(u), self.dim, 0.1, 100.0)], dim=-1)
        h = self.proj(feats.to(self.proj.weight.dtype))
        for block in self.blocks:
            h = h + block(h)
        return self.out_norm(h)


@dataclass
class WindowOutput:
    logits: torch.Tensor      # (B, M, k, V): q_1..q_k (inverse-cdf) or noise outputs (argmax)
    tokens: torch.Tensor      # (B, M, k) the window's tokens under this head
    context_logits: torch.Tensor | None = None   # (B, R, V) at every real token (window_pass)


class PushForward(nn.Module):
    def __init__(self, teacher: Transformer, cfg: StudentConfig):
        super().__init__()
        self.config = cfg
        # the copy trains even when the teacher passed in is frozen
        self.backbone = copy.deepcopy(teacher).requires_grad_(True)
        self.noise = NoiseEncoder(teacher.config.dim, cfg, teacher.config.norm_eps)
        if cfg.layout == "teacher-preserving":
            # kept out of state_dict / parameters: the frozen teacher is a reference, not a weight
            object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        else:
            object.__setattr__(self, "teacher", None)

    @property
    def model_config(self):
        return self.backbone.config

    @property
    def context_model(self) -> Transformer:
        """The weights that read real tokens (and own the KV cache)."""
        return self.teacher if self.teacher is not None else self.backbone

    def _apply(self, fn, recurse=True):
        # the frozen teacher is no submodule (it is not a weight of the student), so every
        # device / dtype move (.to, .cuda, .half, .bfloat16, ...) carries it along here
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    # -- heads ----------------------------------------------------------------------------------
    def _head(self, first: torch.Tensor | None, noise_out: torch.Tensor, u: torch.Tensor,
              tau: torch.Tensor) -> WindowOutput:
        """first (B, M, V) logits at the anchor (inverse-cdf), noise_out (B, M, n, V)."""
        if self.config.head == "argmax":
            return WindowOutput(noise_out, noise_out.argmax(-1))
        logits = torch.cat([first.unsqueeze(2), noise_out], dim=2)           # (B, M, k, V)
        probs = tempered_probs(logits, tau)
        return WindowOutput(logits, inverse_cdf(probs, u, self.config.cdf_order))

    # -- decoding: one pass of real tokens (into the cache) + noise tokens (dropped) -------------
    def window_pass(self, cache: KVCache, real: torch.Tensor, real_pos: torch.Tensor,
                    u: torch.Tensor, tau: torch.Tensor, penalty: torch.Tensor | None = None,
                    context_logits: bool = False) -> WindowOutput:
        """real (B, R) tokens at positions real_pos (B, R), committed to the cache; u (B, k)
        uniforms; noise token i sits at position real_pos[:, -1] + i. Returns (B, 1, k) tokens.

        penalty (B, V) is subtracted from every output's logits (frequency penalty).
        context_logits: also return the context model's logits at every real token; in the
        teacher-preserving layout these are the teacher's (lossless mode verifies with them)."""
        B, R = real.shape
        k = u.shape[-1]
        n = self.config.n_noise(k)
        noise = self.noise(u[:, :n], tau.reshape(B, 1))                     # (B, n, D)
        noise_pos = real_pos[:, -1:] + torch.arange(1, n + 1, device=real.device)
        if self.teacher is None:
            emb = torch.cat([self.backbone.tok_embeddings(real), noise.to(cache.dtype)], 1)
            h = self.backbone(embeds=emb, input_pos=torch.cat([real_pos, noise_pos], 1),
                              cache=cache, commit=R, return_hidden=True)
            h_real, h_noise = h[:, :R], h[:, R:]
        elif n and not torch.is_grad_enabled():
            # decoding: both streams in one pass, layer by layer (half the per-op overhead)
            h_real, h_noise = two_stream_pass(self.teacher, self.backbone, cache, real, real_pos,
                                              noise.to(cache.dtype), noise_pos,
                                              last_only=not context_logits)
        else:
            h_real = self.teacher(real, input_pos=real_pos, cache=cache,
                                  last_only=not context_logits, return_hidden=True)
            h_noise = (self.backbone(embeds=noise.to(cache.dtype), input_pos=noise_pos,
                                     cache=cache, commit=0, return_hidden=True)
                       if n else h_real[:, :0])
        h_last = h_real[:, -1:]
        noise_logits = self.backbone.output(h_noise)
        ctx = self.context_model.output(h_real) if context_logits else None
        first = None
        if self.config.head == "inverse-cdf":
            first = ctx[:, -1:] if ctx is not None else self.context_model.output(h_last)
        if penalty is not None:
            noise_logits = noise_logits - penalty[:, None]
            first = None if first is None else first - penalty[:, None]
        out = self._head(None if first is None else first[:, 0][:, None], noise_logits[:, None],
                         u[:, None], tau)
        out.context_logits = ctx
        return out

    # -- training: one staircase pass -----------------------------------------------------------
    def staircase_forward(self, x: torch.Tensor, u: torch.Tensor, tau: torch.Tensor,
                          anchors: torch.Tensor | None = None,
                          known: torch.Tensor | None = None) -> WindowOutput:
        """Windows of k = u.shape[-1] tokens for chosen anchors of a context, in one pass.

        x (B, N) context, u (B, M, k) uniforms, tau (B,), anchors (M,) context indices
        (default all N), known (B, M, k') tokens fed before the noise (two-level staircase).
        """
        B, N = x.shape
        anchors = torch.arange(N, device=x.device) if anchors is None else anchors.to(x.device)
        M, k = anchors.numel(), u.shape[-1]
        check_k(k, self.config.max_k)
        check_tau(tau)
        kn = 0 if known is None else known.shape[-1]
        n = self.config.n_noise(k)
        w = kn + n
        st = staircase(N, w, anchors, device=x.device)
        real_idx, noise_idx = _stream_indices(N, M, kn, n, x.device)
        tokens = x if known is None else torch.cat([x, known.flatten(1, 2)], dim=1)
        noise = self.noise(u[..., :n], tau.reshape(B, 1, 1)).flatten(1, 2)   # (B, M*n, D)
        h = torch.empty(B, st.mask.shape[0], self.model_config.dim, device=x.device,
                        dtype=noise.dtype)
        if self.teacher is None:
            emb = torch.empty_like(h)
            emb[:, real_idx] = self.backbone.tok_embeddings(tokens)
            emb[:, noise_idx] = noise
            h = self.backbone(embeds=emb, input_pos=st.positions, mask=st.mask[None, None],
                              return_hidden=True)
        else:
            # the frozen teacher reads the real tokens into a cache; the noise stream reads it
            cache = KVCache.for_model(self.teacher, B, max_len=st.mask.shape[0])
            with torch.no_grad():
                h_real = self.teacher(tokens, input_pos=st.positions[real_idx],
                                      mask=st.mask[real_idx][:, real_idx][None, None],
                                      cache=cache, return_hidden=True)
            order = torch.cat([real_idx, noise_idx])
            h = h.index_copy(1, real_idx, h_real.to(h.dtype))
            if n:
                h_noise = self.backbone(embeds=noise, input_pos=st.positions[noise_idx],
                                        mask=st.mask[noise_idx][:, order][None, None],
                                        cache=cache, commit=0, return_hidden=True)
                h = h.index_copy(1, noise_idx, h_noise)
        noise_logits = self.backbone.output(h[:, noise_idx]).view(
            B, M, n, self.model_config.vocab_size)
        first = None
        if self.config.head == "inverse-cdf":
            # q_1: the distribution at the last real token before the noise of each window
            last = anchors if kn == 0 else N + torch.arange(M, device=x.device) * w + kn - 1
            first = self.context_model.output(h[:, last])                   # (B, M, V)
        return self._head(first, noise_logits, u[..., :k], tau)


def two_stream_pass(teacher: Transformer, backbone: Transformer, cache: KVCache,
                    real: torch.Tensor, real_pos: torch.Tensor, noise: torch.Tensor,
                    noise_pos: torch.Tensor, last_only: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-preserving decoding step in one pass: at every layer the teacher's block
    reads the real tokens and the trainable copy reads the noise tokens (noise rows see the
    cache, the real tokens and earlier noise; real rows never see noise). The real rows are
    computed exactly as the teacher's own pass computes them (same shapes, same mask), so the
    cache stays bit-identical to the teacher's; only the per-call overhead of a second forward
    is saved. Returns the final hidden states (B, R, D) of the real (B, 1, D with last_only)
    and (B, n, D) of the noise tokens; commits R slots (the noise K/V stay in scratch slots the
    next pass overwrites)."""

    B, R = real.shape
    n = noise.shape[1]
    T, past = R + n, cache.length
    cache.check_room(T)
    cos, sin = teacher.rope(torch.cat([real_pos, noise_pos], 1))
    valid = cache.valid[:, :past + T] if cache.has_padding else None
    full = causal_mask(T, past, valid, device=real.device)
    full = full.unsqueeze(1) if full.dim() == 3 else full
    # the real rows' mask exactly as Transformer.forward builds it for the teacher alone
    real_mask = None
    if R > 1 or cache.has_padding:
        real_mask = causal_mask(R, past, None if valid is None else valid[:, :past + R],
                                device=real.device)
        real_mask = real_mask.unsqueeze(1) if real_mask.dim() == 3 else real_mask
    noise_mask = full[..., R:, :]
    cos_r, sin_r, cos_n, sin_n = cos[:, :, :R], sin[:, :, :R], cos[:, :, R:], sin[:, :, R:]
    x_r, x_n = teacher.tok_embeddings(real), noise
    for lt, lb in zip(teacher.layers, backbone.layers, strict=True):
        q_r, k_r, v_r = lt.attn.project(lt.attn_norm(x_r), cos_r, sin_r)
        q_n, k_n, v_n = lb.attn.project(lb.attn_norm(x_n), cos_n, sin_n)
        k, v = cache.write(lt.attn.layer_idx, torch.cat([k_r, k_n], 2), torch.cat([v_r, v_n], 2))
        x_r = x_r + lt.attn.attend(q_r, k[:, :, :past + R], v[:, :, :past + R], real_mask)
        x_n = x_n + lb.attn.attend(q_n, k, v, noise_mask)
        x_r = x_r + lt.mlp(lt.mlp_norm(x_r))
        x_n = x_n + lb.mlp(lb.mlp_norm(x_n))
    cache.commit(R)
    return teacher.norm(x_r[:, -1:] if last_only else x_r), backbone.norm(x_n)


def _stream_indices(N: int, M: int, kn: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence indices of real tokens (context + known) and of noise tokens in a staircase."""
    idx = torch.arange(N + M * (kn + n), device=device)
    slot = (idx - N) % (kn + n) if kn + n else torch.zeros_like(idx)
    is_real = (idx < N) | (slot < kn)
    return idx[is_real], idx[~is_real]
