"""The static-shape AR decode step (Transformer.decode_static) and its compiled form
(compile_decode): the same logits and cache as the eager step, the same tokens through
generate_ar, one graph for every step."""

from __future__ import annotations

import torch
from test_feedback import tiny_student

from kforcing.core.kv_cache import KVCache
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import CACHE_ROUND, generate_ar
from kforcing.decoding.common import prefill
from kforcing.decoding.generate import generate

TOL = 1e-5
PROMPTS = [[5, 9, 2, 7, 1], [3, 8]]          # ragged: row 1 is left-padded


@torch.inference_mode()
def test_static_step_matches_the_eager_step_and_cache(make_model):
    model = make_model().eval()
    eager = KVCache.for_model(model, 2, max_len=16)
    static = KVCache.for_model(model, 2, max_len=16)
    pre = prefill(model, eager, PROMPTS)
    prefill(model, static, PROMPTS)
    pos, tok = pre.next_pos, torch.tensor([4, 6])
    for _ in range(6):
        a = model(tok[:, None], input_pos=pos[:, None], cache=eager)[:, -1]
        model.compiled_step = model.decode_static
        b = model.compiled_pass(tok[:, None], pos[:, None], static)[:, -1]
        model.compiled_step = None
        assert float((a - b).abs().max()) < TOL
        tok, pos = a.argmax(-1), pos + 1
    assert static.length == eager.length
    L = eager.length
    for ke, ks in zip(eager.k + eager.v, static.k + static.v, strict=True):
        assert float((ke[:, :, :L] - ks[:, :, :L]).abs().max()) < TOL


def test_generate_ar_through_the_static_step_gives_the_eager_tokens(make_model):
    """compiled=True routes every step through model.compiled_step (here the uncompiled
    static step, so the test needs no C++ compiler): tokens equal to eager decoding, greedy and
    sampled, with padding."""
    model = make_model().eval()
    for sampling in (SamplingConfig(temperature=0.0), SamplingConfig(coupling="gumbel"),
                     SamplingConfig(temperature=0.8, top_k=20)):
        eager = generate_ar(model, PROMPTS, 10, sampling=sampling, seed=3, compiled=False)
        model.compiled_step = model.decode_static
        try:
            static = generate_ar(model, PROMPTS, 10, sampling=sampling, seed=3)
        finally:
            model.compiled_step = None
        assert static.tokens == eager.tokens
        assert static.forward_passes == eager.forward_passes


def test_compile_decode_compiles_one_graph_with_the_eager_tokens(make_model):
    """The real torch.compile graph (inductor): greedy tokens equal to eager AR, a second call
    with another cache size and batch reuses or extends the graph without error."""
    model = make_model().eval()
    eager = generate_ar(model, PROMPTS, 12, seed=0, compiled=False)
    model.compile_decode()
    first = generate_ar(model, PROMPTS, 12, seed=0)
    assert first.tokens == eager.tokens
    again = generate_ar(model, PROMPTS[:1], CACHE_ROUND + 3, seed=0)
    ref = generate_ar(model, PROMPTS[:1], CACHE_ROUND + 3, seed=0, compiled=False)
    assert again.tokens == ref.tokens


def test_kforcing_mode_through_the_teachers_static_pass_gives_the_eager_tokens(make_model):
    """K-Forcing mode's k-token teacher passes through compiled_pass (the uncompiled static
    graph here): the same tokens as eager passes; lossless keeps its eager passes."""
    teacher = make_model().eval()
    student = tiny_student(teacher)
    calls = []

    def static(*a):
        calls.append(a[0].shape[1])
        return teacher.decode_static(*a)
    out = {}
    for compiled in (False, True):
        teacher.compiled_step = static if compiled else None
        out[compiled] = [generate(student, PROMPTS, 9, mode=m, k=3, seed=2).tokens
                         for m in ("kforcing", "lossless")]
    teacher.compiled_step = None
    assert out[True] == out[False]
    assert calls and set(calls) == {3}          # only K-Forcing's 3-token windows
