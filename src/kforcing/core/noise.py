"""Counter-based noise: every random number a decoder uses is a pure function of
(row seed, token index, [vocabulary id]).

Token j of a row (j = 0 for the first generated token) is always sampled with the same noise,
whichever decoder draws it (AR, K-Forcing, the draft of the feedback student, the lossless
verifier), however many tokens a pass emits, and whichever other rows share the batch. That
is what makes lossless output token-identical to AR sampling, and a served request's text
independent of the requests it was batched with.

Two kinds of noise per token (docs/METHOD.md, "Coupling"):
- `uniforms`: one U[0, 1) number (float64) per token, for inverse-CDF sampling;
- `gumbel`: one standard Gumbel vector over the vocabulary per token, for Gumbel-max sampling
  (token = argmax(log p + g)).

The hash is a few rounds of a 32-bit integer mixer (murmur3's finaliser) on int64 tensors, so
it runs on any device, in batch, with no generator state to carry or to save.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_STREAM_U_HI, _STREAM_U_LO, _STREAM_GUMBEL = 0x68E31DA4, 0xB5297A4D, 0x1B56C4E9


def _mix(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, v: torch.Tensor | int) -> torch.Tensor:
    return _mix((h ^ ((v * _GOLDEN) & _M32)) & _M32)


def _seed_words(seed: int) -> tuple[int, int]:
    seed = int(seed) & ((1 << 64) - 1)
    return seed & _M32, seed >> 32


class NoiseStream:
    """Noise for a batch of rows, one seed per row.

    seeds: (B,) ints (any Python ints; reduced mod 2^64). Rows with equal seeds get equal noise.
    """

    def __init__(self, seeds: list[int] | torch.Tensor, device: str | torch.device = "cpu"):
        seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
        lo, hi = zip(*(_seed_words(s) for s in seeds), strict=True) if seeds else ((), ())
        self.seeds = seeds
        self.device = torch.device(device)
        lo_t, hi_t = torch.tensor(lo, dtype=torch.long), torch.tensor(hi, dtype=torch.long)
        base = _combine(_mix(lo_t), hi_t)
        self._base = base.to(self.device)                      # (B,) per-row hash state

    @classmethod
    def from_seed(cls, seed: int, batch_size: int, device: str | torch.device = "cpu"
                  ) -> NoiseStream:
        """Row b gets seed `seed + b`: one integer seeds a whole batch reproducibly."""
        return cls([seed + b for b in range(batch_size)], device)

    def __len__(self) -> int:
        return len(self.seeds)

    def to(self, device: str | torch.device) -> NoiseStream:
        return NoiseStream(self.seeds, device)

    def rows(self, index: torch.Tensor | list[int]) -> NoiseStream:
        """The sub-stream of these rows (a row keeps its noise when the batch changes)."""
        idx = index.tolist() if torch.is_tensor(index) else list(index)
        return NoiseStream([self.seeds[i] for i in idx], self.device)

    def _token_hash(self, index: torch.Tensor, stream: int) -> torch.Tensor:
        """index (B, W) token indices -> (B, W) 32-bit hashes."""
        index = index.to(self.device, torch.long)
        h = _combine(self._base[:, None].expand_as(index), stream)
        return _combine(h, index & _M32)

    def uniforms(self, index: torch.Tensor) -> torch.Tensor:
        """index (B, W) -> (B, W) float64 in [0, 1): token index[b, w]'s uniform for row b."""
        hi = self._token_hash(index, _STREAM_U_HI) >> 6           # 26 bits
        lo = self._token_hash(index, _STREAM_U_LO) >> 5           # 27 bits
        return (hi * (1 << 27) + lo).double() / float(1 << 53)

    def gumbel(self, index: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """index (B, W) -> (B, W, V) float32 standard Gumbel noise."""
        h = self._token_hash(index, _STREAM_GUMBEL)                              # (B, W)
        v = torch.arange(vocab_size, device=self.device, dtype=torch.long)
        bits = _combine(h[..., None], v)                                         # (B, W, V)
        u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))                      # (0, 1)
        return -torch.log(-torch.log(u))
