"""Sampling as a deterministic function of explicit uniforms (inverse-CDF), the primitive that
K-Forcing, its distillation targets and lossless verification are all built on.

token = InvCDF(p, u): order the vocabulary, accumulate p in that order, return the first token
whose cumulative probability exceeds u. With u ~ U[0, 1) the token is an exact sample of p; with
the same u, two models agree exactly when their CDF intervals for that u agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kforcing.core.noise import NoiseStream
from kforcing.errors import KForcingError

CDF_ORDERS = ("vocab", "sorted")
# how a token is tied to its noise: one uniform through the inverse CDF (the paper's parallel
# students need it: their networks must be smooth in u), or one Gumbel vector through argmax
# (near-optimal agreement between two nearby distributions; docs/METHOD.md, "Coupling")
COUPLINGS = ("inverse-cdf", "gumbel")


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cdf_order: str = "vocab"
    coupling: str = "inverse-cdf"

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise KForcingError(f"temperature must be a finite number >= 0, got "
                                f"{self.temperature}")
        if self.top_k < 0:
            raise KForcingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise KForcingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cdf_order not in CDF_ORDERS:
            raise KForcingError(f"cdf_order must be one of {CDF_ORDERS}, got '{self.cdf_order}'")
        if self.coupling not in COUPLINGS:
            raise KForcingError(f"coupling must be one of {COUPLINGS}, got '{self.coupling}'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs_from_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) after temperature, top-k and top-p (float32)."""
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if cfg.temperature != 1.0:        # x / 1 == x exactly: skip a pass over (..., V)
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, order: str = "vocab") -> torch.Tensor:
    """probs (..., V), u (...) in [0, 1) -> token ids (...), long.

    order 'vocab' accumulates in token-id order (the K-Forcing release); 'sorted' in order of
    decreasing probability (ties by id), so small u pick likely tokens.
    """
    if order == "sorted":
        sorted_p, perm = torch.sort(probs, dim=-1, descending=True, stable=True)
        idx = inverse_cdf(sorted_p, u, "vocab")
        return perm.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    if order != "vocab":
        raise KForcingError(f"cdf order must be one of {CDF_ORDERS}, got '{order}'")
    cdf = probs.double().cumsum(-1)
    # scale u by the total so rounding in the sum can never push u past the last interval
    target = (u.double() * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def gumbel_scores(probs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """probs (..., V), g (..., V) or broadcastable standard Gumbel -> log p + g (..., V), the
    scores whose argmax is a Gumbel-max sample (gumbel_max) and whose top-w a draft tree
    proposes (top_tokens).

    log(0) takes a slow path on CPU (about 30x a normal log): zero and subnormal probabilities
    are raised to the smallest normal float first. The argmax cannot change: their scores stay
    below log(2^-126) + max g < -50 (g from uniforms in (0, 1) of float64 at most), while the
    largest probability (>= 1/V) scores above -log(V) - 4."""
    tiny = torch.finfo(torch.float32).tiny
    logp = probs.float().clamp_min(tiny).log_()    # a new tensor: add in place when exact
    same = logp.shape == g.shape and logp.dtype == g.dtype
    return logp.add_(g) if same else logp + g


def gumbel_max(probs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """probs (..., V), g (..., V) standard Gumbel -> argmax(log p + g) (...), long: an exact
    sample of p; two distributions sampled with the same g agree with probability at least
    (1 - TV) / (1 + TV). probs sum to 1 (as probs_from_logits gives)."""
    return gumbel_scores(probs, g).argmax(-1)


def draw(probs: torch.Tensor, noise: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """probs (..., V) and the token's noise -> tokens (...) under cfg's coupling: noise is (...)
    uniforms for 'inverse-cdf', (..., V) Gumbel vectors for 'gumbel'."""
    if cfg.coupling == "gumbel":
        return gumbel_max(probs, noise)
    return inverse_cdf(probs, noise, cfg.cdf_order)


def token_noise(stream: NoiseStream, index: torch.Tensor, cfg: SamplingConfig,
                vocab_size: int) -> torch.Tensor:
    """The noise of tokens index (B, W) of each row under cfg's coupling: (B, W) uniforms or
    (B, W, V) Gumbel vectors."""
    if cfg.coupling == "gumbel":
        return stream.gumbel(index, vocab_size)
    return stream.uniforms(index)


def top_tokens(logits: torch.Tensor, noise: torch.Tensor, cfg: SamplingConfig, w: int
               ) -> torch.Tensor:
    """logits (B, n, V), one token index's noise (B, V) -> (B, n, w): the w tokens that score
    highest where `sample` takes its maximum (the logits when greedy, log p + g under the
    Gumbel coupling). The inverse-CDF coupling ranks no alternatives: an error."""
    if cfg.greedy:
        return logits.topk(w, -1).indices
    if cfg.coupling != "gumbel":
        raise KForcingError("draft trees need the Gumbel coupling (or greedy decoding)")
    return gumbel_scores(probs_from_logits(logits, cfg), noise[:, None]).topk(w, -1).indices


def sample(logits: torch.Tensor, noise: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (..., V), noise (see `draw`) -> tokens (...): the one sampling function every
    decoder uses."""
    if cfg.greedy:
        return logits.argmax(-1)
    return draw(probs_from_logits(logits, cfg), noise, cfg)
