"""Tokens -> text, one decoder step at a time: incremental detokenization, stop sequences, stop
tokens and max_tokens for one request.

The text a client receives is the concatenation of the deltas `feed` returns, whether it
streams or not, so streamed and non-streamed responses are equal by construction. A delta
never contains text that may still turn out to be the start of a stop sequence, nor half of a
multi-byte character (byte-level tokenizers decode those as U+FFFD until the rest arrives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

REPLACEMENT = "\ufffd"


@dataclass
class Delta:
    text: str                     # new text the client may see now
    finish_reason: str | None     # "stop" (stop token or sequence), "length" or None


class TextStream:
    """decode(ids) -> str is the tokenizer's decoder (special tokens skipped)."""

    def __init__(self, decode: Callable[[list[int]], str], *, max_tokens: int,
                 stop: list[str] = (), stop_ids: set[int] | frozenset = frozenset()):
        self.decode = decode
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.stop_ids = set(stop_ids)
        self.tokens: list[int] = []
        self.sent = ""                    # text already returned in deltas
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, new: list[int]) -> Delta:
        """Take the tokens one decoder step gained; return what may be shown now."""
        if self.finished or not new:
            return Delta("", self.finish_reason)
        for t in new:
            if len(self.tokens) == self.max_tokens:
                self.finish_reason = "length"
                break
            self.tokens.append(t)
            if t in self.stop_ids:
                self.finish_reason = "stop"
                break
        if self.finish_reason is None and len(self.tokens) == self.max_tokens:
            self.finish_reason = "length"
        return self._delta()

    def close(self, reason: str = "length") -> Delta:
        """The decoder stopped feeding this request: flush what was held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._delta()

    def _delta(self) -> Delta:
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            text, self.finish_reason = text[:cut], "stop"
        if not self.finished:
            text = text[:len(text) - self._held_back(text)]
        if not text.startswith(self.sent):
            # the decoder rewrote already-sent text (a tokenizer whose decoding of a prefix is
            # not a prefix of the decoding): keep what was sent, continue after it
            return Delta("", self.finish_reason)
        delta, self.sent = text[len(self.sent):], text
        return Delta(delta, self.finish_reason)

    def _stop_at(self, text: str) -> int | None:
        """Index of the first stop sequence in text (search only where a new one can start)."""
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Characters at the end of text that may still change: an incomplete character, or a
        suffix that is the start of a stop sequence."""
        n = len(text) - len(text.rstrip(REPLACEMENT))
        body = text[:len(text) - n]
        longest = 0
        for s in self.stop:
            for m in range(min(len(s) - 1, len(body)), longest, -1):
                if body.endswith(s[:m]):
                    longest = m
                    break
        return n + longest
