"""K-Forcing decoding: determinism, exact token counts and pass counts, any k <= max_k, ragged
batches, EOS, frequency penalty, the `generate` entry point and prompt checks."""

from __future__ import annotations

import math

import pytest
import torch

from kforcing.errors import KForcingError
from kforcing.decoding.generate import generate, generate_kforcing
from kforcing.core.kv_cache import KVCache
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.core.sampling import SamplingConfig

PROMPTS = [[5, 17, 200], [1, 2, 3, 4, 5, 6, 7], [250, 9, 9, 31, 64]]


def make_student(make_model, layout="shared", head="argmax", max_k=4, seed=0) -> PushForward:
    teacher = make_model(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + seed)
        student = PushForward(teacher, StudentConfig(max_k=max_k, layout=layout, head=head))
    return student.eval()


@pytest.fixture
def student(make_model) -> PushForward:
    return make_student(make_model)


def test_same_seed_reproduces_different_seed_differs(student):
    a = generate_kforcing(student, PROMPTS, 12, k=3, seed=5)
    b = generate_kforcing(student, PROMPTS, 12, k=3, seed=5)
    c = generate_kforcing(student, PROMPTS, 12, k=3, seed=6)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert all(0 <= t < 256 for row in a.tokens for t in row)
    assert a.extra == {"k": 3}


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
@pytest.mark.parametrize("head", ["argmax", "inverse-cdf"])
@pytest.mark.parametrize("k, n", [(1, 5), (2, 6), (3, 7), (4, 4), (4, 9), (3, 1)])
def test_exact_token_and_pass_counts(make_model, layout, head, k, n):
    student = make_student(make_model, layout, head)
    res = generate_kforcing(student, PROMPTS, n, k=k, seed=0)
    assert [len(t) for t in res.tokens] == [n] * len(PROMPTS)
    assert res.num_tokens == n * len(PROMPTS)
    assert res.forward_passes == math.ceil(n / k)
    assert res.finished == [False] * len(PROMPTS)


def test_default_k_is_max_k(make_model):
    student = make_student(make_model, max_k=2)
    res = generate_kforcing(student, PROMPTS, 6, seed=1)
    assert res.extra == {"k": 2}
    assert res.forward_passes == 3
    assert res.tokens == generate_kforcing(student, PROMPTS, 6, k=2, seed=1).tokens


def test_zero_new_tokens(student):
    res = generate_kforcing(student, PROMPTS, 0, k=2)
    assert res.tokens == [[]] * len(PROMPTS)
    assert res.forward_passes == 0


def test_every_k_up_to_max_k_from_one_student(student):
    """One student trained at max_k serves every k <= max_k, and a window is causal inside, so
    the first k tokens of a window do not depend on how long the window is."""
    for k in range(1, 5):
        res = generate_kforcing(student, PROMPTS, 8, k=k, seed=2)
        assert [len(t) for t in res.tokens] == [8] * len(PROMPTS)
        assert res.forward_passes == math.ceil(8 / k) and res.extra == {"k": k}
    prompt = torch.tensor([PROMPTS[1]])
    pos = torch.arange(prompt.shape[1])[None]
    u = torch.rand(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tau = torch.ones(1, dtype=torch.float64)
    outs = []
    with torch.no_grad():
        for k in range(1, 5):
            cache = KVCache.for_model(student.context_model, 1, max_len=16)
            outs.append(student.window_pass(cache, prompt, pos, u[:, :k], tau).tokens[0, 0])
    for k in range(1, 5):
        assert outs[k - 1].tolist() == outs[3][:k].tolist()


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
def test_padding_does_not_leak_into_other_rows(make_model, layout):
    """Row 0's uniforms are the same in all batches (one (B, k) draw per pass, B equal), so row
    0's tokens may only change if the other row's prompt length (its padding) leaked into it.

    The inverse-cdf head draws the first token of every window from the context model's own
    next-token distribution, so its outputs depend on the context (an untrained argmax student's
    outputs hardly do); the last assertion checks that sensitivity."""
    student = make_student(make_model, layout, "inverse-cdf")
    p1 = [10, 20, 30, 40]
    for k in (1, 3):
        a = generate_kforcing(student, [p1, [7, 8]], 9, k=k, seed=4)
        b = generate_kforcing(student, [p1, [99, 98, 97, 96, 95, 94, 93, 92]], 9, k=k, seed=4)
        c = generate_kforcing(student, [p1, p1], 9, k=k, seed=4)
        assert a.tokens[0] == b.tokens[0] == c.tokens[0]
        assert a.tokens[1] != b.tokens[1]


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
def test_ragged_rows_equal_their_unpadded_generation(make_model, layout):
    """A left-padded row generates what it generates without padding (same uniforms: same row
    index, same batch size)."""
    student = make_student(make_model, layout, "inverse-cdf")
    p = [3, 1, 4, 1, 5]
    for k in (1, 2):
        padded = generate_kforcing(student, [[42] * 9, p], 8, k=k, seed=3)
        plain = generate_kforcing(student, [p, p], 8, k=k, seed=3)
        assert padded.tokens[1] == plain.tokens[1]
        assert padded.tokens[0] != plain.tokens[0]


def test_stop_at_eos(student):
    k, n = 2, 12
    free = generate_kforcing(student, PROMPTS, n, k=k, seed=8).tokens
    eos = free[0][3]
    res = generate_kforcing(student, PROMPTS, n, k=k, seed=8, eos_id=eos)
    for row, full, fin in zip(res.tokens, free, res.finished, strict=True):
        if eos in full:
            assert fin and row == full[: full.index(eos) + 1] and row[-1] == eos
        else:
            assert not fin and row == full
    assert res.finished[0]
    if all(res.finished):
        last = max(full.index(eos) for full in free)
        assert res.forward_passes == last // k + 1
    else:
        assert res.forward_passes == math.ceil(n / k)
    # stop_at_eos=False ignores EOS
    full = generate_kforcing(student, PROMPTS, n, k=k, seed=8, eos_id=eos, stop_at_eos=False)
    assert full.tokens == free and full.finished == [False] * len(PROMPTS)


def test_all_rows_stop_at_eos_early(student):
    """EOS = the first token: the row stops after the first pass with that one token."""
    k = 3
    eos = generate_kforcing(student, [PROMPTS[0]], 9, k=k, seed=0).tokens[0][0]
    res = generate_kforcing(student, [PROMPTS[0]], 9, k=k, seed=0, eos_id=eos)
    assert res.finished == [True] and res.tokens == [[eos]] and res.forward_passes == 1


def test_student_model_config_eos_is_the_default(make_model):
    student = make_student(make_model)
    free = generate_kforcing(student, [PROMPTS[2]], 8, k=2, seed=1).tokens[0]
    student.backbone.config.eos_id = free[1]
    res = generate_kforcing(student, [PROMPTS[2]], 8, k=2, seed=1)
    assert res.tokens == [free[: free.index(free[1]) + 1]] and res.finished == [True]


def test_frequency_penalty(student):
    base = generate_kforcing(student, PROMPTS, 10, k=2, seed=1)
    zero = generate_kforcing(student, PROMPTS, 10, k=2, seed=1, frequency_penalty=0.0)
    assert zero.tokens == base.tokens
    pen = generate_kforcing(student, PROMPTS, 10, k=2, seed=1, frequency_penalty=0.5)
    assert [len(t) for t in pen.tokens] == [10] * len(PROMPTS)
    # a penalty far larger than any logit gap: with k=1 (counts updated after every pass) an
    # argmax student never repeats a token within a row
    huge = generate_kforcing(student, PROMPTS, 30, k=1, seed=1, frequency_penalty=1e6)
    assert all(len(set(row)) == len(row) == 30 for row in huge.tokens)
    plain = generate_kforcing(student, PROMPTS, 30, k=1, seed=1)
    assert any(len(set(row)) < len(row) for row in plain.tokens)


def test_generate_dispatches_to_kforcing(student, make_model):
    a = generate(student, PROMPTS, 6, k=2, seed=3)
    b = generate_kforcing(student, PROMPTS, 6, k=2, seed=3)
    assert a.tokens == b.tokens and a.extra == {"k": 2} and a.forward_passes == 3
    # a SamplingConfig sets the temperature
    c = generate(student, PROMPTS, 6, k=2, seed=3, sampling=SamplingConfig(temperature=0.5))
    d = generate_kforcing(student, PROMPTS, 6, k=2, seed=3, temperature=0.5)
    assert c.tokens == d.tokens
    # k defaults to max_k
    assert generate(student, PROMPTS, 4, seed=3).extra == {"k": 4}


def test_generate_plain_model_rejects_k(make_model):
    model = make_model()
    with pytest.raises(KForcingError, match="K-Forcing student"):
        generate(model, PROMPTS, 4, k=2)
    assert len(generate(model, PROMPTS, 4, k=1).tokens[0]) == 4


def test_bad_arguments_raise(student):
    for kw, msg in (
        ({"k": 5}, "max_k=4"),
        ({"k": 0}, "positive"),
        ({"temperature": 0.0}, "tau"),
        ({"temperature": -1.0}, "tau"),
    ):
        with pytest.raises(KForcingError, match=msg) as e:
            generate_kforcing(student, PROMPTS, 4, **kw)
        assert "\n" not in str(e.value)


def test_prompt_plus_new_tokens_beyond_context_raises(make_model):
    student = make_student(make_model, max_k=2)
    ctx = student.model_config.max_seq_len
    with pytest.raises(KForcingError, match="exceeds"):
        generate_kforcing(student, [[1] * 10], ctx - 5, k=2)
    with pytest.raises(KForcingError, match="empty"):
        generate_kforcing(student, [[1, 2], []], 4, k=2)
    with pytest.raises(KForcingError, match="outside the vocabulary"):
        generate_kforcing(student, [[1, 999]], 4, k=2)
