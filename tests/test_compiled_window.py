"""K-Forcing mode's whole window as one static graph (decoding/feedback_window.py): the same
tokens as the eager window loop, in every shape the loop takes (k, padding, samplers, a draft
vocabulary, rows finishing early), only in K-Forcing mode's chain windows, and a real
torch.compile of it."""

from __future__ import annotations

import pytest
import torch
from test_feedback import tiny_student

from kforcing.core.noise import NoiseStream, gumbel_from_hashes, token_hashes
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.feedback import generate_feedback
from kforcing.decoding.feedback_window import WindowGraph, compile_window
from kforcing.decoding.generate import generate

PROMPTS = [[5, 9, 2, 7, 1], [3, 8]]          # ragged: row 1 is left-padded


def _static(student):
    """student.compiled_window as the uncompiled graph (no C++ compiler needed), counting calls
    by k."""
    graph, calls = WindowGraph(student), []

    def run(*a):
        calls.append(a[3].shape[1])
        return graph(*a)
    object.__setattr__(student, "compiled_window", run)
    return calls


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("sampling", [SamplingConfig(coupling="gumbel"), SamplingConfig(),
                                      SamplingConfig(temperature=0.0)],
                         ids=["gumbel", "inverse-cdf", "greedy"])
def test_the_static_window_gives_the_eager_windows_tokens(make_model, k, sampling):
    student = tiny_student(make_model().eval())
    eager = generate_feedback(student, PROMPTS, 11, k=k, sampling=sampling, seed=4)
    calls = _static(student)
    static = generate_feedback(student, PROMPTS, 11, k=k, sampling=sampling, seed=4)
    assert static.tokens == eager.tokens
    assert static.forward_passes == eager.forward_passes
    assert calls == [k] * eager.extra["windows"]


def test_a_draft_vocabulary_and_rows_that_finish_early(make_model):
    """A draft over 24 of the teacher's ids; an EOS that stops one row while the other goes on
    (its slots are masked out of the teacher's cache as in the eager loop)."""
    teacher = make_model().eval()
    student = tiny_student(teacher, draft_vocab_size=24)
    free = generate_feedback(student, PROMPTS, 16, k=3, seed=1, stop_at_eos=False)
    eos = free.tokens[0][4]          # row 0 reaches it after 5 tokens
    eager = generate_feedback(student, PROMPTS, 16, k=3, seed=1, eos_id=eos)
    _static(student)
    assert generate_feedback(student, PROMPTS, 16, k=3, seed=1, stop_at_eos=False).tokens \
        == free.tokens
    static = generate_feedback(student, PROMPTS, 16, k=3, seed=1, eos_id=eos)
    assert static.tokens == eager.tokens and static.finished == eager.finished
    assert len(static.tokens[0]) < 16


def test_lossless_and_trees_keep_the_eager_loop(make_model):
    student = tiny_student(make_model().eval())
    sampling = SamplingConfig(coupling="gumbel")
    ref = [generate_feedback(student, PROMPTS, 9, k=3, mode="lossless", seed=2).tokens,
           generate_feedback(student, PROMPTS[:1], 9, k=3, mode="lossless", seed=2,
                             sampling=sampling, tree=(2, 1)).tokens,
           generate_feedback(student, PROMPTS, 9, k=3, seed=2, refeed=False).tokens]
    calls = _static(student)
    got = [generate_feedback(student, PROMPTS, 9, k=3, mode="lossless", seed=2).tokens,
           generate_feedback(student, PROMPTS[:1], 9, k=3, mode="lossless", seed=2,
                             sampling=sampling, tree=(2, 1)).tokens,
           generate_feedback(student, PROMPTS, 9, k=3, seed=2, refeed=False).tokens]
    assert got == ref and calls == []


def test_gumbel_vectors_from_hashes_are_the_streams_own():
    """The graph's out-of-place hashes and Gumbel vectors equal NoiseStream's bit for bit eagerly;
    compiled, only the logarithm's last bit may differ (inductor's vectorized log)."""
    stream = NoiseStream([3, 99, 2 ** 40 + 7])
    index = torch.arange(12).view(3, 4)
    for V in (50, 8192):
        ref = stream.gumbel(index, V)
        hashes, words = stream.gumbel_hashes(index), stream.vocab_words(V)
        assert torch.equal(token_hashes(stream.gumbel_state(), index), hashes)
        assert torch.equal(gumbel_from_hashes(hashes, words), ref)
    compiled = torch.compile(gumbel_from_hashes, fullgraph=True)(hashes, words)
    assert torch.allclose(compiled, ref, rtol=1e-6, atol=1e-6)


def test_compile_window_compiles_one_graph_with_the_eager_tokens(make_model):
    """The real torch.compile graph (inductor, frozen weights): greedy and Gumbel-sampled tokens
    equal to the eager loop's (rounding could flip a near-tie; none on this tiny model), through
    `generate`; another batch and cache size; the student's own state is untouched."""
    student = tiny_student(make_model().eval())
    keys = set(student.state_dict())
    greedy = SamplingConfig(temperature=0.0)
    eager = [generate_feedback(student, PROMPTS, 13, k=4, sampling=greedy, seed=0).tokens,
             generate_feedback(student, PROMPTS, 13, k=4, seed=0).tokens,
             generate_feedback(student, PROMPTS[:1], 40, k=4, sampling=greedy, seed=0).tokens]
    compile_window(student)
    assert set(student.state_dict()) == keys
    compiled = [generate(student, PROMPTS, 13, mode="kforcing", k=4, temperature=0.0).tokens,
                generate(student, PROMPTS, 13, mode="kforcing", k=4, seed=0).tokens,
                generate(student, PROMPTS[:1], 40, mode="kforcing", k=4, temperature=0.0).tokens]
    assert compiled == eager
