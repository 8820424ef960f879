"""K-Forcing decoding: determinism, exact token counts and pass counts, any k <= max_k, ragged
batches, per-row noise, EOS, frequency penalty, the `generate` entry point (modes, k="auto",
options a student cannot honour) and prompt checks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding import autok
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import generate_feedback
from kforcing.decoding.generate import generate
from kforcing.decoding.kforcing import generate_kforcing
from kforcing.decoding.lossless import generate_lossless
from kforcing.errors import KForcingError
from kforcing.students.feedback import FeedbackConfig, FeedbackStudent
from kforcing.students.pushforward import PushForward, StudentConfig

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
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
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


def test_the_context_message_says_why_each_decoder_has_less(make_model):
    """Issue 13 item 10: the teacher, the student and lossless state different usable contexts
    (32 / 30 / 28 here) and now say why."""
    student = make_student(make_model, layout="teacher-preserving", max_k=2)
    teacher = student.teacher
    ctx = teacher.config.max_seq_len
    prompt = [[1] * 10]
    with pytest.raises(KForcingError) as e:
        generate_ar(teacher, prompt, ctx)
    assert str(e.value).endswith(f"exceeds the model's context of {ctx} tokens")
    with pytest.raises(KForcingError) as e:
        generate_kforcing(student, prompt, ctx - 11, k=2)
    assert str(e.value).endswith(f"exceeds the usable context of {ctx - 2} tokens (the model's "
                                 f"context of {ctx} minus k=2 slots the K-Forcing window needs)")
    with pytest.raises(KForcingError) as e:
        generate_lossless(student, prompt, ctx - 13, k=2)
    assert str(e.value).endswith(f"exceeds the usable context of {ctx - 4} tokens (the model's "
                                 f"context of {ctx} minus 2k=4 slots the lossless window needs)")


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
def test_a_rows_output_does_not_depend_on_its_batch(make_model, layout):
    """Seed 5 alone, or as row 1 of a batch of 3 with other prompts and seeds: the same text."""
    student = make_student(make_model, layout, "inverse-cdf")
    p = [10, 20, 30]
    for k in (1, 3):
        alone = generate_kforcing(student, [p], 10, k=k, noise=NoiseStream([5]))
        batch = generate_kforcing(student, [[7] * 6, p, [1]], 10, k=k,
                                  noise=NoiseStream([11, 5, 2]))
        assert batch.tokens[1] == alone.tokens[0], k


def test_window_n_reads_the_uniforms_of_tokens_n_to_n_plus_k(make_model):
    """A perfect map (teacher-preserving, inverse-cdf head, k=1) is the teacher's AR sampler;
    with the same noise it reproduces AR decoding at every k=1 pass."""
    student = make_student(make_model, "teacher-preserving", "inverse-cdf")
    kf = generate_kforcing(student, PROMPTS, 12, k=1, seed=4)
    ar = generate_ar(student.teacher, PROMPTS, 12, seed=4)
    assert kf.tokens == ar.tokens


@pytest.mark.parametrize("kw, flag", [({"top_k": 5}, "top_k=5"), ({"top_p": 0.5}, "top_p=0.5")])
def test_student_refuses_filters_it_cannot_honour(make_model, kw, flag):
    """Issue 13 item 4: top-k / top-p on a student were silently dropped."""
    student = make_student(make_model, "teacher-preserving", "argmax")
    with pytest.raises(KForcingError, match=flag) as e:
        generate(student, PROMPTS, 4, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(KForcingError, match=flag):
        generate_kforcing(student, PROMPTS, 4, sampling=SamplingConfig(**kw))
    # the teacher samples in lossless mode, so there they are honoured
    res = generate(student, PROMPTS, 4, mode="lossless", seed=1, **kw)
    assert res.tokens == generate(student.teacher, PROMPTS, 4, seed=1, **kw).tokens


def test_student_refuses_another_cdf_order_and_gumbel(student):
    with pytest.raises(KForcingError, match="cdf_order 'sorted'.*trained with cdf_order 'vocab'"):
        generate(student, PROMPTS, 4, sampling=SamplingConfig(cdf_order="sorted"))
    with pytest.raises(KForcingError, match="coupling 'gumbel'"):
        generate(student, PROMPTS, 4, sampling=SamplingConfig(coupling="gumbel"))


def test_temperature_outside_the_trained_range_warns_once(student):
    """Issue 13 item 12: a temperature outside the student's trained tau range gets a warning."""
    student.trained_tau = (0.7, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(student, PROMPTS, 4, temperature=0.8)
    with pytest.warns(UserWarning, match=r"temperature 3 is outside .*\[0.7, 1\]") as rec:
        generate(student, PROMPTS, 4, temperature=3.0)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)


def test_mode_ar_with_a_student_decodes_its_teacher(make_model):
    tp = make_student(make_model, "teacher-preserving", "argmax")
    res = generate(tp, PROMPTS, 8, mode="ar", seed=2, temperature=0.8)
    assert res.tokens == generate_ar(tp.teacher, PROMPTS, 8, seed=2,
                                     sampling=SamplingConfig(temperature=0.8)).tokens
    shared = make_student(make_model, "shared", "argmax")
    with pytest.raises(KForcingError, match="needs its teacher"):
        generate(shared, PROMPTS, 8, mode="ar")
    teacher = make_model()
    assert generate(shared, PROMPTS, 8, mode="ar", teacher=teacher, seed=2).tokens == \
        generate(teacher, PROMPTS, 8, seed=2).tokens
    with pytest.raises(KForcingError, match="k=2 needs mode"):
        generate(tp, PROMPTS, 8, mode="ar", k=2)


def fake_timer(table):
    """A Timer that reports fixed tokens/s per k (three identical runs each)."""
    def timer(student, batch_size, ks, context):
        return {k: [table[k]] * 3 for k in ks}
    return timer


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KFORCING_CACHE", str(tmp_path / "cache"))


def test_k_auto_uses_the_winning_k_and_says_it_looks_at_speed_only(make_model, monkeypatch,
                                                                   cache_env):
    student = make_student(make_model, "teacher-preserving", "argmax")
    monkeypatch.setattr(autok, "measure_tokens_per_s", fake_timer({1: 10.0, 2: 30.0, 4: 20.0}))
    res = generate(student, PROMPTS, 6, k="auto", seed=3)
    assert res.tokens == generate(student, PROMPTS, 6, k=2, seed=3).tokens
    auto = res.extra["auto"]
    assert auto["k"] == 2 and auto["decoded_with"] == "kforcing"
    assert "speed only" in auto["note"] and "k=2" in auto["reason"]


def test_k_auto_lossless_falls_back_to_ar_when_ar_wins(make_model, monkeypatch, cache_env):
    """Issue 10: `--k auto --lossless` failed whenever AR won the calibration; now the teacher
    decodes plain AR (the same tokens lossless would give)."""
    student = make_student(make_model, "teacher-preserving", "argmax")
    monkeypatch.setattr(autok, "measure_tokens_per_s", fake_timer({1: 100.0, 2: 60.0, 4: 30.0}))
    res = generate(student, PROMPTS, 8, k="auto", mode="lossless", seed=5)
    assert res.extra["auto"]["k"] == 1 and res.extra["auto"]["decoded_with"] == "ar (the teacher)"
    assert res.tokens == generate(student, PROMPTS, 8, k=2, mode="lossless", seed=5).tokens
    assert res.tokens == generate_ar(student.teacher, PROMPTS, 8, seed=5).tokens
    # a student's kforcing mode falls back to its teacher's AR too
    kf = generate(student, PROMPTS, 8, k="auto", seed=5)
    assert kf.tokens == res.tokens and kf.extra["auto"]["decoded_with"] == "ar (the teacher)"
    # a shared-layout student without its teacher at hand decodes its own one-token windows
    shared = make_student(make_model, "shared", "argmax")
    own = generate(shared, PROMPTS, 8, k="auto", seed=5)
    assert own.extra["auto"]["decoded_with"] == "kforcing"
    assert own.tokens == generate_kforcing(shared, PROMPTS, 8, k=1, seed=5).tokens


def test_generate_dispatches_a_feedback_student(make_model):
    """Modes of the token-feedback student go to its decoder; its lossless mode and mode 'ar'
    are the teacher's AR sampling under the student's coupling (Gumbel by default)."""
    teacher = make_model(seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        fb = FeedbackStudent(teacher, FeedbackConfig(max_k=3)).eval()
    gumbel = SamplingConfig(coupling="gumbel")
    ar = generate_ar(teacher, PROMPTS, 9, sampling=gumbel, seed=4)
    assert generate(fb, PROMPTS, 9, mode="ar", seed=4).tokens == ar.tokens
    assert generate(fb, PROMPTS, 9, mode="lossless", k=3, seed=4).tokens == ar.tokens
    kf = generate(fb, PROMPTS, 9, k=3, seed=4)
    assert kf.tokens == generate_feedback(fb, PROMPTS, 9, k=3, seed=4).tokens
    assert kf.extra["k"] == 3
