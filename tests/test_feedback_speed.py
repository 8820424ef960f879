"""The feedback student's fast draft steps (FeedbackStudent.propose: RoPE rows and padding mask
prepared once per window; compile_draft) against the reference loop on the general draft()
path: the same proposals and q logits, bit for bit, in every window of a real decode."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_feedback import RAGGED, ar_reference, tiny_student, tiny_teacher

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.common import left_pad
from kforcing.decoding.feedback import Window, WindowNoise, _noise, _prefill, generate_feedback
from kforcing.students.feedback import FeedbackStudent


class Checked(FeedbackStudent):
    """Runs the reference on a copy of the draft cache before every fast propose and checks
    that both give the same proposals, q logits and cache."""
    windows = 0

    def propose(self, window):
        ref_win = dataclasses.replace(window, draft_cache=copy.deepcopy(window.draft_cache))
        ref = FeedbackStudent.propose_stepwise(self, ref_win)
        got = super().propose(window)
        assert torch.equal(got, ref)
        if window.k > 1:
            assert torch.equal(window.q_logits, ref_win.q_logits)
        a, b = window.draft_cache, ref_win.draft_cache
        assert a.length == b.length and all(map(torch.equal, a.k + a.v, b.k + b.v))
        type(self).windows += 1
        return got


SAMPLINGS = [SamplingConfig(coupling="gumbel"),
             SamplingConfig(temperature=0.8, coupling="inverse-cdf", top_k=5)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: s.coupling)
@pytest.mark.parametrize("prompts", [RAGGED[1:2], RAGGED[:3]], ids=["batch1", "batch3"])
@pytest.mark.parametrize("draft_vocab", [None, 7])
@pytest.mark.parametrize("mode", ["lossless", "kforcing"])
def test_fast_propose_is_the_reference_bit_for_bit(sampling, prompts, draft_vocab, mode):
    teacher = tiny_teacher(vocab=12)
    student = tiny_student(teacher, cls=Checked, draft_vocab_size=draft_vocab)
    Checked.windows = 0
    for k in (1, 2, 4):
        for refeed in (True, False):
            generate_feedback(student, prompts, 11, k=k, mode=mode, sampling=sampling,
                              noise=NoiseStream.from_seed(3, len(prompts)), refeed=refeed)
    assert Checked.windows > 20


def _window(student, prompts, k, sampling):
    ids, valid, pos = left_pad(prompts, "cpu")
    t_cache = KVCache.for_model(student.teacher, len(prompts), max_len=ids.shape[1] + 8)
    d_cache = student.new_cache(len(prompts), max_len=ids.shape[1] + 8)
    noise = NoiseStream.from_seed(5, len(prompts))
    first, h, _ = _prefill(student, t_cache, d_cache, ids, valid, pos, noise, sampling)
    G = _noise(noise, torch.arange(1, k + 1).expand(len(prompts), k), sampling,
               student.vocab_size)
    return Window(k, first, h, pos[:, -1] + 1, d_cache, t_cache, G, sampling)


@torch.inference_mode()
def test_an_invalid_slot_ahead_falls_back_to_the_reference_path():
    """Slots ahead of the cache are valid in every decode; if one is not, propose takes the
    general path, and still matches the reference."""
    teacher = tiny_teacher(vocab=12)
    student = tiny_student(teacher)
    s = SAMPLINGS[0]
    win = _window(student, RAGGED[:3], 4, s)
    win.draft_cache.valid[1, win.draft_cache.length + 1] = False
    win.draft_cache.has_padding = True
    ref_win = dataclasses.replace(win, draft_cache=copy.deepcopy(win.draft_cache))
    assert torch.equal(student.propose(win), student.propose_stepwise(ref_win))
    assert torch.equal(win.q_logits, ref_win.q_logits)


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_draft_steps_match_eager_and_lossless_stays_exact():
    """compile_draft: the same proposals as the eager path on a tiny student (its q logits to
    float rounding), and lossless decoding still reproduces seeded AR sampling exactly."""
    teacher = tiny_teacher(vocab=40)
    eager = tiny_student(teacher)
    compiled = tiny_student(teacher).compile_draft()
    s = SAMPLINGS[0]
    for prompts in (RAGGED[1:2], RAGGED[:3]):
        we, wc = _window(eager, prompts, 4, s), _window(compiled, prompts, 4, s)
        assert torch.equal(compiled.propose(wc), eager.propose(we))
        torch.testing.assert_close(wc.q_logits, we.q_logits, atol=1e-5, rtol=1e-5)
    noise = NoiseStream.from_seed(1, len(RAGGED))
    res = generate_feedback(compiled, RAGGED, 12, k=4, mode="lossless", sampling=s, noise=noise)
    assert res.tokens == ar_reference(teacher, RAGGED, 12, s, noise)


@pytest.mark.parametrize("sampling", [SamplingConfig(coupling="gumbel"),
                                      SamplingConfig(coupling="inverse-cdf"),
                                      SamplingConfig(temperature=0.0)],
                         ids=["gumbel", "inverse-cdf", "greedy"])
def test_window_noise_made_lazily_is_the_whole_windows_noise(sampling):
    """Each slot, whole or at a draft vocabulary's ids, made alone or wrapped from the whole
    window's noise, carries the same bits."""
    stream = NoiseStream.from_seed(7, 3)
    index = torch.tensor([[1, 2, 3, 4], [9, 10, 11, 12], [5, 6, 7, 8]])
    whole = _noise(stream, index, sampling, 50)
    ids = torch.tensor([3, 0, 49, 17])
    lazy, given = WindowNoise(stream, index, sampling, 50), WindowNoise.given(whole, sampling)
    for i in (2, 0, -1, 3):
        want = whole[:, i][:, ids] if whole.dim() == 3 else whole[:, i]
        # only the ids' entries made (a fresh window), then the whole slot, then the ids again
        assert torch.equal(WindowNoise(stream, index, sampling, 50).slot(i, ids), want)
        for w in (lazy, given):
            assert torch.equal(w.slot(i), whole[:, i])
            assert torch.equal(w.slot(i, ids), want)
