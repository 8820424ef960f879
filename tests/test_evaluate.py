"""Evaluation harness: match and first-token TV of a perfect map, the entropy drop of a repeating
sampler, distinct-n / entropy / generative perplexity on known cases, the judge's perplexity
against an explicit computation, and `kforcing eval` end to end on a tiny model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn as nn

from kforcing.cli.main import main
from kforcing.core.noise import NoiseStream
from kforcing.errors import KForcingError
from kforcing.evaluation.evaluate import (
    EvalConfig,
    build_eval_set,
    evaluate,
    evaluate_student,
    rollout_ar,
    rollout_kforcing,
)
from kforcing.evaluation.match import first_token_tv
from kforcing.evaluation.quality import (
    distinct_n,
    generative_perplexity,
    judge_perplexity,
    unigram_entropy,
)
from kforcing.io.checkpoint import load_model
from kforcing.io.tokens import TokenFile
from kforcing.recipes.eval_report import eval_markdown
from kforcing.students.pushforward import PushForward, StudentConfig, WindowOutput
from kforcing.students.store import save_student
from kforcing.students.targets import teacher_conditionals

# the saved tiny model has a 32-token context: prompt 8 + 12 new tokens + windows fit
SMALL = dict(prompts=6, prompt_len=8, new_tokens=12, context_len=16, windows=32, tv_contexts=3,
             tv_draws=200, samples=2, batch_size=4)


@pytest.fixture(scope="module")
def teacher(saved_tiny_model):
    return load_model(saved_tiny_model).eval()


@pytest.fixture(scope="module")
def split(tiny_corpus):
    return TokenFile(tiny_corpus.validation)


def perfect(teacher, order="vocab", max_k=2) -> PushForward:
    """teacher-preserving + inverse-cdf at k=1 is exactly the teacher's sampler."""
    return PushForward(teacher, StudentConfig(max_k=max_k, layout="teacher-preserving",
                                              head="inverse-cdf", cdf_order=order)).eval()


class Repeater(PushForward):
    """A degenerate sampler: every token of every window is token 7."""

    def _head(self, first, noise_out, u, tau) -> WindowOutput:
        return WindowOutput(noise_out, torch.full(u.shape, 7, dtype=torch.long, device=u.device))


# -- a perfect map -------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_perfect_student_matches_everything_and_has_zero_tv(teacher, split, tiny_tokenizer,
                                                            order):
    cfg = EvalConfig(tau=0.8, **SMALL)
    res = evaluate(teacher, split, [("perfect", perfect(teacher, order), 1)], cfg=cfg,
                   tokenizer=tiny_tokenizer)
    t, (s,) = res["teacher"], res["students"]
    assert s["first_token_match"] == s["joint_match"] == 1.0
    assert s["per_position_match"] == [1.0]
    assert s["first_token_tv"] == s["first_token_tv_bias_bound"] == 0.0
    assert s["first_token_tv_coupling_bound"] == 0.0
    # same uniforms: its free-running samples are the teacher's, so every figure is the same
    assert s["agree_prefix"] == cfg.new_tokens
    for key in ("gen_ppl_teacher", "unigram_entropy", "distinct_1", "distinct_2", "distinct_3"):
        assert s[key] == t[key], key
    assert [e["student"] for e in s["samples"]] == [e["teacher"] for e in s["samples"]]
    assert [e["text"] for e in t["samples"]] == [e["teacher"] for e in s["samples"]]
    assert t["judge_ppl"] is None and s["judge_ppl"] is None
    assert math.isfinite(t["gen_ppl_teacher"]) and t["gen_ppl_teacher"] > 1


def test_rollouts_from_the_same_noise(teacher, split):
    """rollout_ar equals an explicit uncached AR loop on the row's uniforms; a perfect map at
    k=1 reproduces it, while k=2 (its second token is not trained) does not."""
    eset = build_eval_set(teacher, split, EvalConfig(**SMALL))
    prompts, noise, L = eset.prompts[:3], eset.noise.rows([0, 1, 2]), SMALL["new_tokens"]
    y = rollout_ar(teacher, prompts, noise, L, 1.0)
    assert y.shape == (3, L)
    seq = prompts
    with torch.no_grad():
        for j in range(L):
            u = noise.uniforms(torch.full((3, 1), j))
            tok = torch.searchsorted(teacher(seq)[:, -1].softmax(-1).double().cumsum(-1),
                                     u, right=True)[:, 0]
            assert torch.equal(tok, y[:, j]), j
            seq = torch.cat([seq, tok[:, None]], 1)
    assert torch.equal(rollout_kforcing(perfect(teacher), prompts, noise, L, 1.0, 1), y)
    assert rollout_kforcing(perfect(teacher), prompts, noise, L, 1.0, 2).shape == y.shape


def test_eval_noise_is_per_prompt_and_per_seed(teacher, split):
    """A prompt's sample does not depend on the batch size it was decoded in, and eval seeds
    give distinct noise rows."""
    a = build_eval_set(teacher, split, EvalConfig(**SMALL))
    b = build_eval_set(teacher, split, EvalConfig(**{**SMALL, "batch_size": 1}))
    assert torch.equal(a.teacher_samples(teacher, "vocab"), b.teacher_samples(teacher, "vocab"))
    c = build_eval_set(teacher, split, EvalConfig(**{**SMALL, "seed": 1}))
    assert not set(a.noise.seeds) & set(c.noise.seeds)
    assert isinstance(a.noise, NoiseStream) and len(a.noise) == SMALL["prompts"]


@pytest.mark.parametrize("tau", [float("nan"), float("inf"), 0.0])
def test_eval_tau_must_be_finite_and_positive(tau):
    with pytest.raises(KForcingError, match="tau must be a finite number > 0"):
        EvalConfig(tau=tau)


def test_evaluation_is_deterministic(teacher, split):
    torch.manual_seed(0)
    student = PushForward(teacher, StudentConfig(max_k=2)).eval()
    cfg = EvalConfig(**SMALL)
    a = evaluate_student(student, teacher, split, k=2, cfg=cfg)
    b = evaluate_student(student, teacher, split, k=2, cfg=cfg)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert len(a["per_position_match"]) == 2 and a["k"] == 2
    assert a["joint_match"] <= min(a["per_position_match"])


# -- a degenerate sampler -----------------------------------------------------------------------

def test_repeating_sampler_shows_the_entropy_drop_and_its_tv(teacher, split):
    cfg = EvalConfig(**SMALL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rep = Repeater(teacher, StudentConfig(max_k=2)).eval()
    res = evaluate(teacher, split, [("repeat", rep, 2)], cfg=cfg)
    t, (s,) = res["teacher"], res["students"]
    assert s["unigram_entropy"] == 0.0 < t["unigram_entropy"]
    n = cfg.prompts * cfg.new_tokens
    assert s["distinct_1"] == 1 / n and s["distinct_2"] == 1 / (n - cfg.prompts)
    assert t["distinct_1"] > s["distinct_1"]
    # the student's first token is always 7: TV = 1 - p(7), estimated from the teacher's draws
    eset = build_eval_set(teacher, split, cfg)
    x = eset.tv_x
    no_known = torch.zeros(x.shape[0], 1, 0, dtype=torch.long)
    p7 = teacher_conditionals(teacher, x, no_known, torch.tensor([x.shape[1] - 1])
                              )[:, 0, 0].softmax(-1)[:, 7].double()
    sd = float((p7 * (1 - p7)).sum().sqrt()) / (cfg.tv_draws ** 0.5 * len(p7))
    assert abs(s["first_token_tv"] - float(1 - p7.mean())) <= 5 * sd + 1e-9
    assert s["first_token_tv"] == pytest.approx(s["first_token_tv_coupling_bound"])


class Shifted(PushForward):
    """The teacher's sampler read at u + 1/2 (mod 1): the same distribution, another coupling."""

    def _head(self, first, noise_out, u, tau) -> WindowOutput:
        return super()._head(first, noise_out, (u + 0.5) % 1.0, tau)


def test_first_token_tv_of_an_exact_sampler_with_another_coupling(teacher, split):
    """The estimate is then pure Monte-Carlo noise: inside its bias bound and far below the
    coupling bound (the tokens disagree for most uniforms)."""
    eset = build_eval_set(teacher, split, EvalConfig(**{**SMALL, "tv_draws": 2000}))
    shifted = Shifted(teacher, StudentConfig(layout="teacher-preserving", head="inverse-cdf"))
    res = first_token_tv(shifted, teacher, eset.tv_x, eset.tv_u, 1.0)
    assert 0 < res["first_token_tv"] <= res["first_token_tv_bias_bound"]
    assert res["first_token_tv"] < res["first_token_tv_coupling_bound"]


# -- metrics on hand-made cases -------------------------------------------------------------------

def test_distinct_n_and_unigram_entropy_by_hand():
    assert distinct_n([[1, 2, 3, 1, 2, 3]], 1) == 3 / 6
    assert distinct_n([[1, 2, 3, 1, 2, 3]], 2) == 3 / 5
    assert distinct_n([[1, 2, 3, 1, 2, 3]], 3) == 3 / 4
    assert distinct_n([[1, 2], [1, 2]], 2) == 1 / 2          # pooled over samples
    assert distinct_n([[1, 2], [4]], 3) == 0.0               # no 3-grams at all
    assert unigram_entropy([5] * 10) == 0.0
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([1, 2, 3, 4] * 4) > unigram_entropy([1, 2] * 8)


class FixedLM(nn.Module):
    """A 'model' whose next-token distribution is the same after every context."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = logp

    def forward(self, idx, **_):
        return self.logp.expand(*idx.shape, -1)


def test_generative_perplexity_of_known_distributions(teacher):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50, (5, 4), generator=g)
    samples = torch.randint(0, 50, (5, 9), generator=g)
    assert generative_perplexity(FixedLM(torch.zeros(50)), prompts, samples) == \
        pytest.approx(50.0, rel=1e-6)
    logp = torch.randn(50, generator=g).log_softmax(-1)
    want = math.exp(-float(logp[samples].double().mean()))
    assert generative_perplexity(FixedLM(logp), prompts, samples, batch_size=2) == \
        pytest.approx(want, rel=1e-6)
    # a real model: the same as scoring every token after its own prefix
    nll = []
    with torch.no_grad():
        for b in range(5):
            for j in range(samples.shape[1]):
                seq = torch.cat([prompts[b], samples[b, :j]])[None]
                nll.append(-float(teacher(seq)[0, -1].log_softmax(-1)[samples[b, j]]))
    assert generative_perplexity(teacher, prompts, samples, batch_size=2) == \
        pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


# -- the judge ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judge():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "the", "a", "river", "stone", "walked", "quiet", "sea", "rain",
             "sun", "old", "new"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                  unk_token="<unk>")
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), hf_tok


TEXTS = ["the river walked", "a quiet sea the old sun stone", "rain", "new stone the a"]
PROMPTS = ["the sun", "old", "a river the", "sea"]


def explicit_judge(model, tok, texts, prompts=None) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for i, text in enumerate(texts):
            ctx = tok.encode(prompts[i], add_special_tokens=False) if prompts else []
            y = tok.encode(text, add_special_tokens=False)
            ids = torch.tensor([ctx + y])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for j in range(max(len(ctx), 1), ids.shape[1]):
                nll -= float(logp[j - 1, ids[0, j]])
                n += 1
    return math.exp(nll / n)


def test_judge_perplexity_equals_unbatched_scoring(judge):
    model, tok = judge
    for prompts in (None, PROMPTS):
        want = explicit_judge(model, tok, TEXTS, prompts)
        got = judge_perplexity(TEXTS, model, tok, prompts=prompts, batch_size=3)
        assert got == pytest.approx(want, rel=1e-5)


def test_judge_with_flat_logits_has_vocab_size_perplexity(judge):
    model, tok = judge
    flat = type(model)(model.config).eval()
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    got = judge_perplexity(TEXTS, flat, tok, prompts=PROMPTS)
    assert got == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_evaluate_scores_decoded_samples_with_the_judge(judge, teacher, split, tiny_tokenizer):
    """The judge reads decoded text with its own tokenizer; a perfect map's text is the
    teacher's, so both get the same judge perplexity."""
    res = evaluate(teacher, split, [("perfect", perfect(teacher), 1)], cfg=EvalConfig(**SMALL),
                   tokenizer=tiny_tokenizer, judge=judge)
    t, (s,) = res["teacher"], res["students"]
    assert math.isfinite(t["judge_ppl"]) and t["judge_ppl"] == s["judge_ppl"] > 1


# -- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student_dir(teacher, saved_tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "perfect"
    save_student(perfect(teacher), out, saved_tiny_model, extra={"k": 1})
    return out


def eval_argv(student, tiny_corpus, out, *extra) -> list[str]:
    argv = ["eval", "--student", str(student), "--data", str(tiny_corpus.dir), "--out", str(out),
            "--judge", "none", "--quiet", "--tv-draws", "64"]
    for key, v in SMALL.items():
        if key != "tv_draws":
            argv += ["--" + key.replace("_", "-"), str(v)]
    return argv + list(extra)


def test_cli_eval_writes_json_with_all_keys(capsys, student_dir, tiny_corpus, tmp_path):
    out = tmp_path / "results" / "eval.json"
    md = tmp_path / "eval.md"
    rc = main(eval_argv(student_dir, tiny_corpus, out, "--k", "1,2", "--markdown", str(md)))
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out.read_text())
    for key in ("gen_ppl_teacher", "unigram_entropy", "judge_ppl"):
        assert key in res["teacher"]
    assert [s["k"] for s in res["students"]] == [1, 2]
    for s in res["students"]:
        for key in ("k", "tau", "first_token_match", "joint_match", "per_position_match",
                    "gen_ppl_teacher", "unigram_entropy", "judge_ppl", "first_token_tv"):
            assert key in s, key
        assert len(s["per_position_match"]) == s["k"] and s["student"] == str(student_dir)
        assert s["trained_k"] == 1
    assert res["students"][0]["joint_match"] == 1.0
    assert res["command"].startswith("kforcing eval --student")
    assert "| teacher (AR) |" in stdout and md.read_text() == eval_markdown(res)


def test_cli_eval_defaults_to_the_trained_k(capsys, student_dir, tiny_corpus, tmp_path):
    out = tmp_path / "eval.json"
    assert main(eval_argv(student_dir, tiny_corpus, out)) == 0
    assert [s["k"] for s in json.loads(out.read_text())["students"]] == [1]


def one_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kforcing: error: "), err
    return err


def test_cli_eval_errors(capsys, student_dir, saved_tiny_model, tiny_corpus, tmp_path):
    out = tmp_path / "eval.json"
    assert "max_k=2" in one_error(capsys, eval_argv(student_dir, tiny_corpus, out, "--k", "3"))
    assert "not both" in one_error(capsys, eval_argv(student_dir, tiny_corpus, out, "--model",
                                                     str(saved_tiny_model)))
    assert "not found" in one_error(capsys, eval_argv(tmp_path / "nope", tiny_corpus, out))
    assert "context" in one_error(capsys, eval_argv(student_dir, tiny_corpus, out,
                                                    "--new-tokens", "40"))
    one_error(capsys, eval_argv(student_dir, tiny_corpus, out, "--judge", str(tmp_path / "j")))
    # a student whose tokenizer is not the corpus's
    from tokenizers import Tokenizer
    other = tmp_path / "other"
    shutil.copytree(student_dir, other)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.add_tokens(["zzzz"])
    tok.save(str(other / "tokenizer.json"))
    assert "mismatched tokenizer" in one_error(capsys, eval_argv(other, tiny_corpus, out))
    assert not out.exists()
