"""The token-feedback student: lossless output equals seeded AR sampling (both couplings), a
perfect draft makes K-Forcing mode equal AR sampling, save/load, the teacher cache, training
resume, and the errors a user can hit."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kforcing.core.config import ModelConfig
from kforcing.core.kv_cache import KVCache
from kforcing.core.model import Transformer
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, sample, token_noise
from kforcing.decoding.feedback import generate_feedback, summarize_matches, window_match
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, save_model
from kforcing.students.feedback import (
    FEEDBACK_FILE,
    FeedbackConfig,
    FeedbackStudent,
    is_feedback_dir,
    load_feedback,
    save_feedback,
)
from kforcing.training.feedback import (
    FeedbackTrainConfig,
    FeedbackTrainer,
    soft_ce_dense,
    soft_ce_top,
)
from kforcing.training.feedback_cache import CacheSpec, build_teacher_cache, load_teacher_cache

RAGGED = [[1, 2, 1], [1, 2, 0, 1, 2, 2, 1], [2], [0, 1], [2, 2, 2, 2, 1]]


def tiny_teacher(vocab: int = 12, eos: int | None = None, seed: int = 0) -> Transformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(ModelConfig.preset("tiny", vocab_size=vocab, eos_id=eos,
                                              max_seq_len=64)).eval()


def tiny_student(teacher, cls=FeedbackStudent, seed: int = 1, **cfg) -> FeedbackStudent:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fcfg = FeedbackConfig(**{"max_k": 4, **cfg})
        ids = None
        if fcfg.draft_vocab_size:
            ids = torch.randperm(teacher.config.vocab_size)[:fcfg.draft_vocab_size]
        return cls(teacher, fcfg, ids).eval()


class OracleFeedback(FeedbackStudent):
    """A perfect draft: proposes the teacher's own chain (its conditionals, sampled with the
    window's noise) from a throwaway copy of the teacher's cache."""

    def propose(self, window):
        ghost = copy.deepcopy(window.teacher_cache)

        def step(i, h, y):
            return h, self.teacher(y[:, None], input_pos=(window.pos + i)[:, None],
                                   cache=ghost)[:, -1]
        return self.propose_with(window, step)


@torch.inference_mode()
def ar_reference(teacher, prompts, n, sampling, noise, eos=None) -> list[list[int]]:
    """Seeded AR sampling, one row at a time: token j of row b = sample(logits, noise of (b, j))."""
    rows = []
    V = teacher.config.vocab_size
    for b, prompt in enumerate(prompts):
        cache = KVCache.for_model(teacher, 1, max_len=len(prompt) + n)
        logits = teacher(torch.tensor([prompt]), cache=cache)[:, -1]
        sub, toks = noise.rows([b]), []
        for j in range(n):
            t = int(sample(logits, token_noise(sub, torch.tensor([[j]]), sampling, V)[:, 0],
                           sampling)[0])
            toks.append(t)
            if t == eos:
                break
            logits = teacher(torch.tensor([[t]]), cache=cache)[:, -1]
        rows.append(toks)
    return rows


COUPLED = [SamplingConfig(coupling="gumbel"), SamplingConfig(coupling="inverse-cdf"),
           SamplingConfig(temperature=0.7, coupling="gumbel", top_k=6),
           SamplingConfig(temperature=0.8, coupling="inverse-cdf", top_p=0.9, cdf_order="sorted")]


@pytest.mark.parametrize("sampling", COUPLED, ids=lambda s: f"{s.coupling}-{s.temperature}")
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_lossless_equals_seeded_ar(sampling, k):
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    noise = NoiseStream([11, 5, 7, 11, 3])
    res = generate_feedback(student, RAGGED, 13, k=k, mode="lossless", sampling=sampling,
                            noise=noise)
    assert res.tokens == ar_reference(teacher, RAGGED, 13, sampling, noise)
    assert 1.0 <= res.extra["tokens_per_pass"] <= k


@pytest.mark.parametrize("refeed", [True, False])
def test_lossless_with_eos_and_either_draft_cache(refeed):
    teacher = tiny_teacher(vocab=6, eos=3)
    student = tiny_student(teacher, draft_vocab_size=4)
    noise = NoiseStream.from_seed(4, len(RAGGED))
    s = SamplingConfig(coupling="gumbel")
    res = generate_feedback(student, RAGGED, 20, k=3, mode="lossless", sampling=s, noise=noise,
                            refeed=refeed)
    ref = ar_reference(teacher, RAGGED, 20, s, noise, eos=3)
    assert res.tokens == ref
    assert res.finished == [r[-1] == 3 for r in ref]


@pytest.mark.parametrize("coupling", ["gumbel", "inverse-cdf"])
def test_perfect_draft_is_ar_sampling_and_accepts_everything(coupling):
    teacher = tiny_teacher(vocab=40)
    oracle = tiny_student(teacher, cls=OracleFeedback, coupling=coupling)
    s = SamplingConfig(temperature=0.9, coupling=coupling)
    noise = NoiseStream.from_seed(9, len(RAGGED))
    ref = ar_reference(teacher, RAGGED, 12, s, noise)
    kf = generate_feedback(oracle, RAGGED, 12, k=4, mode="kforcing", sampling=s, noise=noise)
    assert kf.tokens == ref
    assert kf.extra["windows"] == 3
    ll = generate_feedback(oracle, RAGGED, 12, k=4, mode="lossless", sampling=s, noise=noise)
    assert ll.tokens == ref
    assert ll.extra["tokens_per_pass"] == 4.0
    m = summarize_matches([window_match(oracle, torch.tensor([[1, 2, 3, 4]] * 3), 4, s,
                                        NoiseStream([1, 2, 3]))])
    assert m["joint"] == 1.0 and m["tokens_per_pass"] == 4.0 and m["overlap2"] > 0.999


def test_kforcing_mode_first_token_of_each_window_is_the_teachers():
    """The teacher's cache holds exactly the teacher's own states: every window's y_1 is the
    token the teacher samples, with that token's noise, from a fresh forward over the text."""
    teacher = tiny_teacher(vocab=30)
    student = tiny_student(teacher)
    s = SamplingConfig(coupling="gumbel")
    noise = NoiseStream.from_seed(2, len(RAGGED))
    k = 3
    res = generate_feedback(student, RAGGED, 10, k=k, sampling=s, noise=noise)
    assert all(len(r) == 10 for r in res.tokens) and res.extra["tokens_per_pass"] == k
    for b, (prompt, toks) in enumerate(zip(RAGGED, res.tokens, strict=True)):
        for j in range(0, 10, k):
            logits = teacher(torch.tensor([prompt + toks[:j]]))[:, -1]
            g = token_noise(noise.rows([b]), torch.tensor([[j]]), s, 30)[:, 0]
            assert toks[j] == int(sample(logits, g, s)[0])


def test_draft_vocabulary_maps_back_to_full_ids():
    teacher = tiny_teacher(vocab=20)
    student = tiny_student(teacher, draft_vocab_size=5)
    q = student.logits(torch.randn(3, teacher.config.dim))
    allowed = torch.zeros(20, dtype=torch.bool)
    allowed[student.draft_ids] = True
    assert torch.isinf(q[:, ~allowed]).all() and torch.isfinite(q[:, allowed]).all()
    res = generate_feedback(student, RAGGED, 9, k=4, noise=NoiseStream.from_seed(0, 5))
    for toks in res.tokens:   # y_2..y_4 of every window come from the draft vocabulary
        for j in range(len(toks)):
            if j % 4:
                assert allowed[toks[j]]


def test_draft_head_is_kept_and_remade_when_the_head_changes():
    teacher = tiny_teacher(vocab=20)
    student = tiny_student(teacher, draft_vocab_size=5)
    with torch.inference_mode():
        first = student.head_weight()
    assert torch.equal(first, teacher.output.weight[student.draft_ids])
    assert student.head_weight() is first                     # kept between calls
    h = torch.randn(2, teacher.config.dim, requires_grad=True)
    student.draft_logits(h).sum().backward()                  # made in inference mode, still usable
    assert h.grad is not None
    with torch.no_grad():
        teacher.output.weight.mul_(2)                         # an in-place change of the head
    assert torch.equal(student.head_weight(), teacher.output.weight[student.draft_ids])
    student.double()
    assert student.head_weight().dtype == torch.float64


def test_save_load_round_trip(tmp_path):
    teacher = tiny_teacher(vocab=20)
    tdir = save_model(teacher, tmp_path / "teacher")
    student = tiny_student(teacher, draft_vocab_size=7, draft_layers=2)
    with torch.no_grad():
        for prm in student.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    save_feedback(student, tmp_path / "fb", tdir, extra={"step": 3})
    assert is_feedback_dir(tmp_path / "fb") and not is_feedback_dir(tmp_path / "teacher")
    again = load_feedback(tmp_path / "fb")
    assert again.config == student.config
    assert set(again.state_dict()) == set(student.state_dict())   # the draft only
    assert not any(k.startswith("teacher") for k in again.state_dict())
    kw = dict(k=3, noise=NoiseStream.from_seed(5, 5))
    assert generate_feedback(again, RAGGED, 11, **kw).tokens == \
        generate_feedback(student, RAGGED, 11, **kw).tokens
    shared = load_feedback(tmp_path / "fb", teacher=teacher)
    assert shared.teacher is teacher


def test_to_carries_the_teacher():
    teacher = tiny_teacher()
    student = tiny_student(teacher).to(torch.float64)
    assert student.teacher.output.weight.dtype == torch.float64
    assert student.fc.weight.dtype == torch.float64


def _one_line(exc: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(exc.value) and str(exc.value)


def test_errors_are_one_line(tmp_path):
    teacher = tiny_teacher(vocab=20)
    student = tiny_student(teacher)
    for k in (0, 5, 2.0):
        with pytest.raises(KForcingError) as e:
            generate_feedback(student, RAGGED, 4, k=k)
        _one_line(e)
    with pytest.raises(KForcingError) as e:
        generate_feedback(student, RAGGED, 4, mode="fast")
    _one_line(e)
    for bad in ({"max_k": 0}, {"draft_layers": 0}, {"coupling": "uniform"},
                {"tau_min": 1.2, "tau_max": 1.0}, {"draft_vocab_size": 0}):
        with pytest.raises(KForcingError) as e:
            FeedbackConfig(**bad)
        _one_line(e)
    tdir = save_model(teacher, tmp_path / "teacher")
    save_feedback(student, tmp_path / "fb", tdir)
    (tmp_path / "fb" / FEEDBACK_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(KForcingError) as e:
        load_feedback(tmp_path / "fb")
    _one_line(e)
    save_feedback(student, tmp_path / "fb2", tdir)
    (tmp_path / "teacher" / "model.safetensors").unlink()
    (tmp_path / "teacher" / "config.json").unlink()
    (tmp_path / "teacher").rmdir()
    with pytest.raises(KForcingError) as e:
        load_feedback(tmp_path / "fb2")
    _one_line(e)
    with pytest.raises(KForcingError) as e:
        load_feedback(tmp_path / "nowhere")
    _one_line(e)


# -- training ---------------------------------------------------------------------------------

def _cache_spec(saved_tiny_model, tiny_corpus, **kw):
    return CacheSpec(teacher=str(saved_tiny_model), tokens=str(tiny_corpus.train),
                     **{"block_size": 16, "top_n": 8, "windows": 10, "shard_windows": 4, **kw})


def test_teacher_cache_is_the_teachers_forward_and_resumes(saved_tiny_model, tiny_corpus,
                                                           tmp_path):
    teacher = load_model(saved_tiny_model)
    spec = _cache_spec(saved_tiny_model, tiny_corpus)
    build_teacher_cache(teacher, spec, tmp_path / "a", progress=False, stop_after_shards=1)
    with pytest.raises(KForcingError):
        load_teacher_cache(tmp_path / "a")               # a killed build is incomplete
    build_teacher_cache(teacher, spec, tmp_path / "a", progress=False)   # resumes
    build_teacher_cache(teacher, spec, tmp_path / "b", batch_size=3, progress=False)
    _, a, _ = load_teacher_cache(tmp_path / "a")
    _, b, _ = load_teacher_cache(tmp_path / "b")
    for f in a:
        assert torch.equal(a[f], b[f])
    x = a["tokens"].long()
    with torch.no_grad():
        h = teacher(x, return_hidden=True)
        lp = teacher.output(h).log_softmax(-1)
    assert torch.equal(a["feature"], h.half())
    assert torch.equal(a["top_lp"], lp.topk(8, -1).values.half())
    assert torch.equal(a["top_ids"], lp.topk(8, -1).indices.int())
    with pytest.raises(KForcingError):   # another spec in the same directory
        build_teacher_cache(teacher, _cache_spec(saved_tiny_model, tiny_corpus, top_n=4),
                            tmp_path / "a", progress=False)


def test_soft_ce_top_equals_dense_when_the_top_is_everything():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    q = torch.randn(3, 5, 11, generator=g)
    lp, ids = logits.log_softmax(-1).topk(11, -1)
    tau = torch.tensor([[1.0], [0.7], [0.9]])
    assert torch.allclose(soft_ce_top(q, lp, ids, tau, 11), soft_ce_dense(q, logits, tau),
                          atol=1e-5)
    # with a tail bucket at tau 1 the loss is the exact CE to the top-N + the lumped tail
    lp8, ids8 = lp[..., :8], ids[..., :8]
    one = torch.ones(3, 1)
    logq = q.log_softmax(-1)
    tail_q = logq.gather(-1, ids[..., 8:]).logsumexp(-1)
    want = -(lp8.exp() * logq.gather(-1, ids8)).sum(-1) - lp[..., 8:].logsumexp(-1).exp() * tail_q
    assert torch.allclose(soft_ce_top(q, lp8, ids8, one, 11), want, atol=1e-5)
    # over a draft vocabulary: the same loss as on full logits with -inf outside it
    draft = torch.tensor([0, 2, 3, 5, 7, 8, 10])
    id_map = torch.full((11,), -1)
    id_map[draft] = torch.arange(7)
    q_full = torch.full_like(q, float("-inf"))
    q_full[..., draft] = q[..., draft]
    small = soft_ce_top(q[..., draft], lp8, ids8, tau, 11, id_map)
    logq = (q_full / tau[..., None]).log_softmax(-1).gather(-1, ids8)
    ok = torch.isfinite(logq)
    assert ok.any() and not ok.all()
    # what the tail-bucket loss gives for full logits, with the unreachable targets left out
    t = tau[..., None]
    a = lp8 / t
    tail = (torch.log(1 - lp8.exp().sum(-1)) - math.log(3)) / tau + math.log(3)
    logz = torch.cat([a, tail[..., None]], -1).logsumexp(-1)
    p_top = torch.where(ok, (a - logz[..., None]).exp(), 0.0)
    q_rest = 1 - torch.where(ok, logq.exp(), 0.0).sum(-1)
    want = (-(p_top * torch.where(ok, logq, 0.0)).sum(-1)
            - (tail - logz).exp() * q_rest.clamp(min=1e-6).log())
    assert torch.allclose(small, want, atol=1e-5)


def _train_cfg(saved_tiny_model, tiny_corpus, out, **kw):
    return FeedbackTrainConfig(
        teacher=str(saved_tiny_model), data=str(tiny_corpus.dir), out_dir=str(out),
        **{"batch_size": 4, "context": 16, "anchors": 4, "eval_windows": 8, "eval_context": 12,
           "eval_every_min": 10.0, "ckpt_every": 2, "max_steps": 4, **kw})


def test_training_stages_run_and_resume_exactly(saved_tiny_model, tiny_corpus, tmp_path):
    teacher = load_model(saved_tiny_model)
    cache = build_teacher_cache(teacher, _cache_spec(saved_tiny_model, tiny_corpus),
                                tmp_path / "cache", progress=False)
    fcfg = FeedbackConfig(max_k=4, draft_vocab_size=50)
    cfg = _train_cfg(saved_tiny_model, tiny_corpus, tmp_path / "s1", k=1, cache=str(cache),
                     student=fcfg)
    full = FeedbackTrainer(cfg, progress=False)
    rec = full.fit()
    assert set(rec["val"]) == {"tau=1.0", "tau=0.7"}
    assert rec["val"]["tau=1.0"]["windows"] == 8 and rec["cum_cpu_min"] >= rec["cpu_min"]
    # a run stopped after 2 steps and resumed ends where the uninterrupted one did
    part = _train_cfg(saved_tiny_model, tiny_corpus, tmp_path / "s1b", k=1, cache=str(cache),
                      student=fcfg)
    FeedbackTrainer(part, progress=False).fit(stop_after=2)
    resumed = FeedbackTrainer(part, resume=True, progress=False)
    assert resumed.step == 2
    resumed.fit()
    for (name, a), b in zip(full.student.state_dict().items(),
                            resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    losses = [r["loss"] for r in _records(tmp_path / "s1")]
    assert losses == [r["loss"] for r in _records(tmp_path / "s1b")]
    # self-forcing stages start from the previous one and keep its draft vocabulary
    for k, init in ((2, "s1"), (4, "s2")):
        c = _train_cfg(saved_tiny_model, tiny_corpus, tmp_path / f"s{k}", k=k,
                       init=str(tmp_path / init), max_steps=2, bf16=k == 4)
        tr = FeedbackTrainer(c, progress=False)
        assert torch.equal(tr.student.draft_ids, full.student.draft_ids)
        tr.fit()
    student = load_feedback(tmp_path / "s4")
    res = generate_feedback(student, [[1, 2, 3]], 8, k=4, mode="lossless")
    assert len(res.tokens[0]) == 8


def _records(run):
    return [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text()
                        .splitlines()) if "loss" in r]


def test_draft_head_of_a_student_loaded_in_inference_mode():
    with torch.inference_mode():
        teacher = tiny_teacher(vocab=20)
        student = tiny_student(teacher, draft_vocab_size=5)
        assert torch.equal(student.head_weight(), teacher.output.weight[student.draft_ids])
