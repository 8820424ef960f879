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

The hash is a few rounds of a 32-bit integer mixer (murmur3's finaliser) on int32 tensors that
hold the 32-bit words' bits (products wrap mod 2^32, right shifts are masked to be logical), so it
runs on any device, in batch, with no generator state to carry or to save. The words are the same
as on int64 tensors holding [0, 2^32) (tests/test_fast_paths.py keeps that version as its oracle);
int32 halves the memory traffic of the (B, W, V) Gumbel hash, and every step is in place.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _i32(word: int) -> int:
    """A 32-bit word as the int32 with the same bits."""
    word &= _M32
    return word - (1 << 32) if word >= 1 << 31 else word


_GOLDEN = 0x9E3779B1
_C1, _C2 = _i32(0x85EBCA6B), _i32(0xC2B2AE35)
_STREAM_U_HI, _STREAM_U_LO, _STREAM_GUMBEL = 0x68E31DA4, 0xB5297A4D, 0x1B56C4E9


def _words(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 holding the low 32 bits."""
    x = x & _M32
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _spread(ids: torch.Tensor) -> torch.Tensor:
    """Vocabulary ids (long) -> their spread int32 words, what a Gumbel vector's hashes mix in."""
    return _words(ids) * _i32(_GOLDEN)


# murmur3 fmix32's rounds: (right shift, then multiplier or None)
_ROUNDS = ((16, _C1), (13, _C2), (16, None))


def _mix_(x: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """murmur3 fmix32, in place, on an int32 tensor of words; tmp: scratch of x's shape (one
    buffer for the shifted words rather than a fresh tensor per step: at (B, V) it is faster)."""
    tmp = torch.empty_like(x) if tmp is None else tmp
    for shift, mul in _ROUNDS:
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp &= (1 << (32 - shift)) - 1                      # a logical shift
        x ^= tmp
        if mul is not None:
            x *= mul
    return x


def _combine(h: torch.Tensor, v: torch.Tensor | int) -> torch.Tensor:
    """mix(h xor v * golden) on words: h int32, v an int32 tensor or a Python int (a new tensor)."""
    spread = _i32(v * _GOLDEN) if isinstance(v, int) else v * _i32(_GOLDEN)
    return _mix_(h ^ spread)


def _seed_words(seed: int) -> tuple[int, int]:
    seed = int(seed) & ((1 << 64) - 1)
    return _i32(seed), _i32(seed >> 32)


class NoiseStream:
    """Noise for a batch of rows, one seed per row.

    seeds: (B,) ints (any Python ints; reduced mod 2^64). Rows with equal seeds get equal noise.
    """

    def __init__(self, seeds: list[int] | torch.Tensor, device: str | torch.device = "cpu"):
        seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
        lo, hi = zip(*(_seed_words(s) for s in seeds), strict=True) if seeds else ((), ())
        self.seeds = seeds
        self.device = torch.device(device)
        lo_t, hi_t = torch.tensor(lo, dtype=torch.int32), torch.tensor(hi, dtype=torch.int32)
        base = _combine(_mix_(lo_t), hi_t).to(self.device)     # (B,) per-row hash state
        # each noise stream's per-row state, and the vocabulary's spread words per size V
        self._rows = {s: _combine(base, s) for s in (_STREAM_U_HI, _STREAM_U_LO, _STREAM_GUMBEL)}
        self._vocab: dict[int, torch.Tensor] = {}

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
        """index (B, W) token indices -> (B, W) 32-bit hashes (int32 words)."""
        index = _words(index.to(self.device, torch.long))
        return _combine(self._rows[stream][:, None].expand_as(index), index)

    def uniforms(self, index: torch.Tensor) -> torch.Tensor:
        """index (B, W) -> (B, W) float64 in [0, 1): token index[b, w]'s uniform for row b."""
        hi = (self._token_hash(index, _STREAM_U_HI) >> 6).long() & ((1 << 26) - 1)   # 26 bits
        lo = (self._token_hash(index, _STREAM_U_LO) >> 5).long() & ((1 << 27) - 1)   # 27 bits
        return (hi * (1 << 27) + lo).double() / float(1 << 53)

    def gumbel_hashes(self, index: torch.Tensor) -> torch.Tensor:
        """index (B, W) -> (B, W) int32: the words that gumbel_from_hashes expands into tokens
        index[b, w]'s Gumbel vectors."""
        return self._token_hash(index, _STREAM_GUMBEL)

    def gumbel_state(self) -> torch.Tensor:
        """(B,) int32: each row's Gumbel hash state, the input of token_hashes (a compiled
        graph computes a window's hashes and vectors itself from it)."""
        return self._rows[_STREAM_GUMBEL]

    def vocab_words(self, vocab_size: int) -> torch.Tensor:
        """(V,) int32: each vocabulary id's spread word, the other input of
        gumbel_from_hashes."""
        if vocab_size not in self._vocab:
            self._vocab[vocab_size] = _spread(torch.arange(vocab_size, device=self.device))
        return self._vocab[vocab_size]

    def gumbel_at(self, index: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """index (B, W), ids (N,) vocabulary ids -> (B, W, N) float32: gumbel(index, V)[..., ids]
        for any V > max(ids), bit for bit, made for those N ids only (a draft vocabulary's
        draws need a fraction of each vector)."""
        return gumbel_from_hashes(self.gumbel_hashes(index), _spread(ids.to(self.device)))

    def gumbel(self, index: torch.Tensor, vocab_size: int, out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """index (B, W) -> (B, W, V) float32 standard Gumbel noise, written into `out` when given
        (a decoder that draws a vector per step reuses one buffer: fresh (B, V) tensors cost
        page faults on a busy machine)."""
        h = self.gumbel_hashes(index)                                            # (B, W)
        g = torch.empty((*h.shape, vocab_size), device=self.device) if out is None else out
        # g's memory is the hash's scratch, then holds the noise
        bits = _mix_(h[..., None] ^ self.vocab_words(vocab_size), tmp=g.view(torch.int32))
        bits >>= 8
        bits &= 0xFFFFFF                                                         # 24 bits
        g.copy_(bits).add_(0.5).mul_(1.0 / (1 << 24))                            # (0, 1)
        return g.log_().neg_().log_().neg_()                                     # -log(-log u)


def _fmix(x: torch.Tensor) -> torch.Tensor:
    """_mix_ out of place (murmur3 fmix32 on int32 words), for compiled graphs."""
    for shift, mul in _ROUNDS:
        x = x ^ ((x >> shift) & ((1 << (32 - shift)) - 1))          # a logical shift
        if mul is not None:
            x = x * mul
    return x


def token_hashes(state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """state (B,) int32 (NoiseStream.gumbel_state), index (B, W) token indices -> (B, W) int32:
    NoiseStream.gumbel_hashes(index), out of place."""
    return _fmix(state[:, None] ^ (_words(index) * _i32(_GOLDEN)))


def gumbel_from_hashes(hashes: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """hashes (...) int32 (NoiseStream.gumbel_hashes), words (V,) int32 (vocab_words) -> (..., V)
    float32: NoiseStream.gumbel's vectors, written out of place so that a compiled graph fuses
    them into one loop (the stream's own method works in place, the faster eager form)."""
    x = _fmix(hashes[..., None] ^ words)
    u = ((x >> 8) & 0xFFFFFF).float().add(0.5).mul(1.0 / (1 << 24))             # (0, 1)
    return u.log().neg().log().neg()
