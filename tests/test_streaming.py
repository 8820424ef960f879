"""Streaming (`generate(..., on_tokens=...)`): for every decoder, the tokens handed to the callback
pass by pass, joined, are exactly the returned tokens, and a stop flag ends a row where its stream
ended."""

from __future__ import annotations

import pytest
import torch

from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.decoding.generate import generate
from kforcing.students.feedback import FeedbackConfig, FeedbackStudent
from kforcing.students.pushforward import PushForward, StudentConfig

PROMPTS = [[1, 2, 1], [3, 1, 4, 1, 5], [2]]


def _teacher(eos: int | None = None) -> Transformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Transformer(ModelConfig.preset("tiny", vocab_size=12, eos_id=eos,
                                              max_seq_len=96)).eval()


def _model(kind: str, eos: int | None = None):
    teacher = _teacher(eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        if kind == "teacher":
            return teacher
        if kind == "pushforward":
            return PushForward(teacher, StudentConfig(max_k=4, layout="teacher-preserving")).eval()
        return FeedbackStudent(teacher, FeedbackConfig(max_k=4)).eval()


CASES = [("teacher", "ar"), ("pushforward", "kforcing"), ("pushforward", "lossless"),
         ("feedback", "kforcing"), ("feedback", "lossless")]


class Recorder:
    def __init__(self, stop_row: int | None = None, stop_after: int = 0):
        self.rows: list[list[int]] = []
        self.passes = 0
        self.stop_row, self.stop_after = stop_row, stop_after

    def __call__(self, new: list[list[int]]) -> list[bool]:
        if not self.rows:
            self.rows = [[] for _ in new]
        self.passes += 1
        for r, t in zip(self.rows, new, strict=True):
            r.extend(t)
        stop = [False] * len(new)
        if self.stop_row is not None and len(self.rows[self.stop_row]) >= self.stop_after:
            stop[self.stop_row] = True
        return stop


@pytest.mark.parametrize("eos", [None, 5])
@pytest.mark.parametrize("kind,mode", CASES)
def test_streamed_tokens_joined_equal_the_result(kind, mode, eos):
    model = _model(kind, eos)
    rec = Recorder()
    res = generate(model, PROMPTS, 13, mode=mode, k=None if mode == "ar" else 3, seed=7,
                   on_tokens=rec)
    plain = generate(model, PROMPTS, 13, mode=mode, k=None if mode == "ar" else 3, seed=7)
    assert rec.rows == res.tokens == plain.tokens
    assert rec.passes >= 1


@pytest.mark.parametrize("kind,mode", CASES)
def test_a_stop_flag_ends_the_row_where_its_stream_ended(kind, mode):
    model = _model(kind)
    rec = Recorder(stop_row=1, stop_after=4)
    res = generate(model, PROMPTS, 20, mode=mode, k=None if mode == "ar" else 2, seed=3,
                   on_tokens=rec)
    full = generate(model, PROMPTS, 20, mode=mode, k=None if mode == "ar" else 2, seed=3)
    assert rec.rows == res.tokens
    assert 4 <= len(res.tokens[1]) < 20 and res.tokens[1] == full.tokens[1][:len(res.tokens[1])]
    assert res.tokens[0] == full.tokens[0] and res.tokens[2] == full.tokens[2]
