"""Lossless mode: token-identical to AR sampling from the teacher with the same per-sequence
noise (any student, any acceptance pattern, any batch), and distributed exactly as the
teacher."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch

from kforcing.cli.main import main
from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, sample
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.generate import generate
from kforcing.decoding.kforcing import generate_kforcing
from kforcing.decoding.lossless import generate_lossless
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import save_student

RAGGED = [[1, 2, 1], [1, 2, 0, 1, 2, 2, 1], [2], [0, 1], [2, 2, 2, 2, 1]]


def tiny_teacher(vocab: int, eos: int | None, seed: int = 0) -> Transformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(ModelConfig.preset("tiny", vocab_size=vocab, eos_id=eos)).eval()


def tiny_student(teacher, layout: str, head: str, order: str = "vocab", seed: int = 1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = StudentConfig(max_k=4, layout=layout, head=head, cdf_order=order)
        student = PushForward(teacher, cfg).eval()
    if layout == "shared":   # an imperfect student: its backbone drifts from the teacher
        with torch.no_grad():
            for p in student.backbone.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return student


class OracleStudent(PushForward):
    """Proposes the teacher's exact AR rollout for the given uniforms, then corrupts each
    proposal with probability `p_wrong`: acceptance lengths of every size, row by row.
    Untrained, its context model reads like the teacher (the very teacher in the
    teacher-preserving layout, an exact copy in the shared one), so it rolls out with it."""

    def setup(self, p_wrong: float, seed: int = 0) -> OracleStudent:
        self.p_wrong, self.rng = p_wrong, torch.Generator().manual_seed(seed)
        return self

    def window_pass(self, cache, real, real_pos, u, tau, penalty=None, context_logits=False):
        out = super().window_pass(cache, real, real_pos, u, tau, penalty, context_logits=True)
        cfg = SamplingConfig(temperature=float(tau[0]), cdf_order=self.config.cdf_order)
        ghost = copy.deepcopy(cache)   # the rollout runs in a throwaway copy of the cache
        logits, pos, toks = out.context_logits[:, -1], real_pos[:, -1:], []
        for i in range(u.shape[1]):
            toks.append(sample(logits, u[:, i], cfg))
            pos = pos + 1
            logits = self.context_model(toks[-1][:, None], input_pos=pos, cache=ghost)[:, -1]
        y = torch.stack(toks, 1)
        wrong = torch.rand(y.shape, generator=self.rng) < self.p_wrong
        out.tokens = torch.where(wrong, (y + 1) % self.model_config.vocab_size, y)[:, None]
        return out


def oracle_student(teacher, p_wrong: float, layout: str = "teacher-preserving",
                   seed: int = 0) -> OracleStudent:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        s = OracleStudent(teacher, StudentConfig(max_k=4, layout=layout))
    return s.eval().setup(p_wrong, seed)


def ar(teacher, prompts, n, temp, seed, order="vocab", **kw):
    return generate_ar(teacher, prompts, n, seed=seed,
                       sampling=SamplingConfig(temperature=temp, cdf_order=order, **kw))


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
@pytest.mark.parametrize("head", ["argmax", "inverse-cdf"])
def test_identical_to_ar_sampling(layout, head):
    """Seeds x temperatures x k x batch sizes x ragged prompts, EOS included (token 3 of 4)."""
    teacher = tiny_teacher(4, eos=3)
    student = tiny_student(teacher, layout, head, order="sorted")
    other = teacher if layout == "shared" else None
    n_finished = 0
    for seed, temp, k, B in itertools.product(range(2), [1.0, 0.6], [1, 3, 4], [1, 5]):
        ref = ar(teacher, RAGGED[:B], 24, temp, seed, "sorted")
        got = generate_lossless(student, RAGGED[:B], 24, k=k, temperature=temp, seed=seed,
                                teacher=other)
        assert got.tokens == ref.tokens, (seed, temp, k, B)
        assert got.finished == ref.finished
        n_finished += sum(ref.finished)
    assert n_finished > 0   # EOS did occur, mid-window included


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
@pytest.mark.parametrize("p_wrong", [0.0, 0.3])
def test_identical_to_ar_with_long_acceptances(layout, p_wrong):
    teacher = tiny_teacher(6, eos=None, seed=2)
    student = oracle_student(teacher, p_wrong, layout)
    other = teacher if layout == "shared" else None
    fused = layout == "teacher-preserving"
    for seed, temp, k in itertools.product(range(2), [1.0, 0.8], [2, 4]):
        ref = ar(teacher, RAGGED[:4], 30, temp, seed)
        got = generate_lossless(student, RAGGED[:4], 30, k=k, temperature=temp, seed=seed,
                                teacher=other)
        assert got.tokens == ref.tokens, (seed, temp, k)
        if p_wrong == 0.0 and fused:
            # all proposals agree: the first pass emits one token, every later pass k
            assert got.extra["teacher_passes"] == 1 + math.ceil(29 / k)
            assert got.forward_passes == got.extra["teacher_passes"]   # one pass each
        elif p_wrong == 0.0:
            # k accepted proposals + the teacher's bonus token per student + teacher pass
            assert got.extra["teacher_passes"] == math.ceil(30 / (k + 1))
            assert got.forward_passes == 2 * got.extra["teacher_passes"]
        else:
            assert 1.0 <= got.extra["tokens_per_pass"] <= k + 1


def test_perfect_proposals_with_eos_mid_window():
    teacher = tiny_teacher(4, eos=2, seed=5)
    student = oracle_student(teacher, 0.0)
    seen = 0
    for seed in range(4):
        ref = ar(teacher, RAGGED, 20, 1.0, seed)
        got = generate_lossless(student, RAGGED, 20, k=4, seed=seed)
        assert got.tokens == ref.tokens and got.finished == ref.finished
        seen += sum(ref.finished)
    assert seen > 0


def test_top_k_top_p_and_greedy_are_the_teachers():
    teacher = tiny_teacher(8, eos=None)
    student = tiny_student(teacher, "teacher-preserving", "inverse-cdf")
    for cfg in [SamplingConfig(temperature=0.9, top_k=3), SamplingConfig(top_p=0.7),
                SamplingConfig(temperature=0.0)]:
        ref = generate_ar(teacher, RAGGED, 15, sampling=cfg, seed=4)
        got = generate_lossless(student, RAGGED, 15, k=3, sampling=cfg, seed=4)
        assert got.tokens == ref.tokens


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
def test_a_rows_output_does_not_depend_on_its_batch(layout):
    """Seed 9 alone, or as row 1 of a batch of 3 with other prompts and seeds: the same text,
    and the teacher's AR text for that seed."""
    teacher = tiny_teacher(8, eos=None, seed=3)
    student = tiny_student(teacher, layout, "inverse-cdf")
    other = teacher if layout == "shared" else None
    p = RAGGED[1]
    alone = generate_lossless(student, [p], 20, k=3, noise=NoiseStream([9]), teacher=other)
    batch = generate_lossless(student, [RAGGED[4], p, RAGGED[2]], 20, k=3,
                              noise=NoiseStream([4, 9, 1]), teacher=other)
    assert batch.tokens[1] == alone.tokens[0]
    assert alone.tokens == generate_ar(teacher, [p], 20, noise=NoiseStream([9])).tokens


def test_explicit_noise_equals_the_seeded_default():
    teacher = tiny_teacher(8, eos=None)
    student = tiny_student(teacher, "teacher-preserving", "argmax")
    a = generate_lossless(student, RAGGED, 10, k=2, seed=3)
    b = generate_lossless(student, RAGGED, 10, k=2, noise=NoiseStream.from_seed(3, len(RAGGED)))
    assert a.tokens == b.tokens
    with pytest.raises(KForcingError, match="2 rows for 5 prompts"):
        generate_lossless(student, RAGGED, 10, k=2, noise=NoiseStream([1, 2]))


def test_gumbel_coupling_is_refused_for_pushforward_proposals():
    teacher = tiny_teacher(8, eos=None)
    student = tiny_student(teacher, "teacher-preserving", "argmax")
    with pytest.raises(KForcingError, match="coupling 'gumbel'.*inverse-CDF"):
        generate_lossless(student, RAGGED, 6, sampling=SamplingConfig(coupling="gumbel"))


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value, pooling cells with expected count < 5 into one."""
    small = expected < 5
    obs, exp = observed[~small], expected[~small]
    if small.any():
        obs = torch.cat([obs, observed[small].sum(0, keepdim=True)])
        exp = torch.cat([exp, expected[small].sum(0, keepdim=True)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def test_lossless_samples_follow_the_teachers_exact_distribution():
    """3-token continuations over a 4-token vocabulary: 64 cells, enumerated exactly under the
    teacher; 6000 lossless samples from an imperfect student pass a chi-square test, and the
    same student's plain K-Forcing samples (not lossless) fail it."""
    V, L, N = 4, 3, 6000
    teacher = tiny_teacher(V, eos=None, seed=11)
    student = tiny_student(teacher, "teacher-preserving", "argmax", seed=4)
    prompt = [1, 0, 2]
    exact = torch.zeros(V ** L, dtype=torch.float64)
    for i, seq in enumerate(itertools.product(range(V), repeat=L)):
        ids = torch.tensor([prompt + list(seq)])
        probs = teacher(ids).double().softmax(-1)[0]
        exact[i] = math.prod(float(probs[len(prompt) - 1 + j, seq[j]]) for j in range(L))
    assert abs(float(exact.sum()) - 1) < 1e-6

    def counts(tokens):
        c = torch.zeros(V ** L, dtype=torch.float64)
        for row in tokens:
            c[sum(t * V ** (L - 1 - j) for j, t in enumerate(row))] += 1
        return c

    lossless = generate_lossless(student, [prompt] * N, L, k=3, seed=0)
    plain = generate_kforcing(student, [prompt] * N, L, k=3, seed=0)
    assert _chi_square_p(counts(lossless.tokens), N * exact) > 1e-3
    assert _chi_square_p(counts(plain.tokens), N * exact) < 1e-6


def test_generate_entry_point_and_errors(make_model):
    teacher = tiny_teacher(8, eos=None)
    tp = tiny_student(teacher, "teacher-preserving", "argmax")
    shared = tiny_student(teacher, "shared", "argmax")
    res = generate(tp, RAGGED, 6, k=2, mode="lossless", seed=1)
    assert res.tokens == ar(teacher, RAGGED, 6, 1.0, 1).tokens
    assert res.extra["fused"] and res.extra["mode"] == "lossless"
    assert tp.teacher is teacher   # verification reuses the very same weights
    with pytest.raises(KForcingError, match="needs its teacher"):
        generate(shared, RAGGED, 6, mode="lossless")
    with pytest.raises(KForcingError, match="frequency penalty"):
        generate(tp, RAGGED, 6, mode="lossless", frequency_penalty=0.5)
    with pytest.raises(KForcingError, match="needs a K-Forcing student"):
        generate(teacher, RAGGED, 6, mode="lossless")
    with pytest.raises(KForcingError, match="temperature"):
        generate(tp, RAGGED, 6, mode="lossless", temperature=float("nan"))
    with pytest.raises(KForcingError, match="mode must be"):
        generate(tp, RAGGED, 6, mode="fast")
    with pytest.raises(KForcingError, match="vocabulary"):
        generate_lossless(shared, RAGGED, 6, teacher=make_model())
    with pytest.raises(KForcingError, match="k must|k="):
        generate_lossless(tp, RAGGED, 6, k=5)
    assert generate_lossless(tp, RAGGED, 0).tokens == [[]] * len(RAGGED)


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
def test_cli_generate_and_chat_lossless_equal_the_teachers_ar(saved_tiny_model, tmp_path, capsys,
                                                              layout):
    teacher = load_model(saved_tiny_model)
    out = tmp_path / "student"
    out.mkdir()
    save_student(tiny_student(teacher, layout, "argmax"), out, saved_tiny_model)

    def completions(*argv):
        capsys.readouterr()
        assert main(list(argv)) == 0
        return [json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()]

    common = ["--prompt", "the river", "--prompt", "a small old door was", "--max-new-tokens",
              "12", "--seed", "3", "--temperature", "0.9", "--json"]
    ref = completions("generate", "--model", str(saved_tiny_model), *common)
    assert completions("generate", "--model", str(out), "--lossless", "--k", "3", *common) == ref
    chat = ["--prompt", "the river", "--max-new-tokens", "10", "--seed", "2"]
    capsys.readouterr()
    assert main(["chat", "--model", str(out), "--mode", "ar", *chat]) == 0
    ar_reply = capsys.readouterr().out
    assert main(["chat", "--model", str(out), "--mode", "lossless", "--k", "2", *chat]) == 0
    assert capsys.readouterr().out == ar_reply
