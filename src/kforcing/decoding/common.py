"""What every decoder shares: the result type, prompt checks, left padding, prefill, the EOS cut
and the device sync used for timing.

Every decoder (AR, K-Forcing, lossless) left-pads its prompts into one batch with per-row RoPE
positions and uses the cache protocol of `Transformer.forward` (docs/METHOD.md, "KV-cache
decoding").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.model import Transformer
from kforcing.core.noise import NoiseStream
from kforcing.errors import KForcingError


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


def check_prompts(prompts: list[list[int]], max_new_tokens: int, context: int, vocab_size: int,
                  *, reserved: int = 0, why: str = "") -> None:
    """Refuse, in one line, prompts a decoder cannot run. `reserved` positions of the model's
    `context` are taken by the decoder itself (e.g. a window of noise tokens); `why` says for
    what ("k=4 slots the K-Forcing window needs")."""
    if not prompts:
        raise KForcingError("no prompts given")
    if max_new_tokens < 0:
        raise KForcingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    usable = context - reserved
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise KForcingError(f"prompt {i} is empty: give at least one token")
        if len(p) + max_new_tokens > usable:
            where = (f"the model's context of {context} tokens" if not reserved else
                     f"the usable context of {usable} tokens (the model's context of {context} "
                     f"minus {why})")
            raise KForcingError(f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new "
                                f"tokens that exceeds {where}")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise KForcingError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                f"of {vocab_size} (mismatched tokenizer?)")


def noise_for(noise: NoiseStream | None, seed: int, batch_size: int,
              device: torch.device) -> NoiseStream:
    """The decoder's noise: the given stream (one seed per row) or rows seeded seed, seed + 1..."""
    if noise is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise KForcingError(f"seed must be an integer, got {seed!r}")
        return NoiseStream.from_seed(seed, batch_size, device)
    if len(noise) != batch_size:
        raise KForcingError(f"the noise stream has {len(noise)} rows for {batch_size} prompts")
    return noise.to(device)


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


def prefill(model: Transformer, cache: KVCache, prompts: list[list[int]]) -> Prefill:
    """Left-pad the prompts into one batch and run them through the model into the cache."""
    ids, valid, pos = left_pad(prompts, cache.device)
    cache.mark_padding(valid)
    logits = model(ids, input_pos=pos, cache=cache, last_only=True)[:, -1]
    return Prefill(logits=logits, next_pos=pos[:, -1] + 1)


def cut_at_eos(rows: list[list[int]], eos: int | None) -> tuple[list[list[int]], list[bool]]:
    """Cut each row after its first EOS (kept): (rows, finished)."""
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


def sync_fn(device: torch.device) -> Callable[[], None]:
    """What to call before reading a timer: waits for queued GPU work (a no-op on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# on_tokens(new) gets, after every forward pass, the tokens each row gained in it (an empty list
# for a row that gained none) and may return one flag per row: True stops that row now (a stop
# sequence was hit, the client went away). Used by the server to stream.
OnTokens = Callable[[list[list[int]]], "list[bool] | None"]


class Streamer:
    """Hands each pass's new tokens to `on_tokens` and takes back the rows to stop.

    It cuts exactly as the result is cut (after EOS when stop_at_eos, at max_new_tokens), so a
    row's streamed tokens joined equal its final tokens; a row stopped by the callback keeps what
    was streamed before the stop (`cut`)."""

    def __init__(self, on_tokens: OnTokens | None, batch_size: int, max_new_tokens: int,
                 eos: int | None):
        self.on_tokens = on_tokens
        self.max_new = max_new_tokens
        self.eos = eos
        self.sent = [0] * batch_size
        self.closed = [False] * batch_size
        self.stopped = [False] * batch_size
        self._closed: torch.Tensor | None = None     # `closed` as a tensor, rebuilt on change

    @property
    def all_closed(self) -> bool:
        """Every row has ended (EOS, max_new_tokens or the callback's stop)."""
        return all(self.closed)

    def push(self, new: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor | None:
        """new (B, W) tokens of this pass, counts (B,) how many of them each row gained (default
        all W) -> (B,) bool rows that must not continue, or None without a callback (read-only:
        the same tensor comes back until a row closes)."""
        if self.on_tokens is None:
            return None
        rows = new.tolist()
        before = list(self.closed)
        n = counts.tolist() if counts is not None else [len(r) for r in rows]
        out = []
        for b, (r, c) in enumerate(zip(rows, n, strict=True)):
            if self.closed[b]:
                out.append([])
                continue
            r = r[:min(c, self.max_new - self.sent[b])]
            if self.eos is not None and self.eos in r:
                r = r[:r.index(self.eos) + 1]
                self.closed[b] = True
            self.sent[b] += len(r)
            self.closed[b] |= self.sent[b] >= self.max_new
            out.append(r)
        for b, stop in enumerate(self.on_tokens(out) or ()):
            if stop and not self.closed[b]:
                self.closed[b] = self.stopped[b] = True
        if self._closed is None or self.closed != before:
            self._closed = torch.tensor(self.closed, dtype=torch.bool, device=new.device)
        return self._closed

    def cut(self, rows: list[list[int]]) -> list[list[int]]:
        """Rows stopped by the callback end where their stream ended."""
        return [r[:s] if stop else r
                for r, s, stop in zip(rows, self.sent, self.stopped, strict=True)]
