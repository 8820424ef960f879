"""The token-feedback student's training on the command line: `kforcing distill --design
feedback` (teacher cache, stages, resume, flags of the other design), `kforcing data chat`, and
the commands `kforcing reproduce` records for the feedback stages."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from kforcing.cli import distill as cli_distill
from kforcing.cli.main import build_parser, main
from kforcing.io.hub import render_chat
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import TokenFile
from kforcing.recipes import reproduce
from kforcing.recipes.feedback import CacheOptions, stage_command
from kforcing.students.feedback import FeedbackConfig, load_feedback
from kforcing.training.feedback import FeedbackTrainConfig
from kforcing.training.feedback_cache import load_teacher_cache

# small enough for the 32-token tiny teacher and a few seconds per stage
SMALL = ["--batch-size", "4", "--context", "16", "--anchors", "4", "--eval-windows", "8",
         "--eval-context", "12", "--eval-every-min", "10", "--ckpt-every", "2", "--quiet"]
CACHE = ["--cache-windows", "10", "--cache-block-size", "16", "--cache-top-n", "8"]


def _distill(capsys, teacher, data, out, *flags) -> dict:
    rc = main(["distill", "--design", "feedback", "--teacher", str(teacher), "--data", str(data),
               "--out", str(out), *SMALL, *flags])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out.strip().splitlines()[-1])


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_distill_feedback_builds_the_cache_then_trains_the_stages(saved_tiny_model, tiny_corpus,
                                                                   tmp_path, capsys):
    s1 = tmp_path / "fb" / "s1"
    rec = _distill(capsys, saved_tiny_model, tiny_corpus.dir, s1, "--k", "1", "--max-steps", "3",
                   "--draft-vocab", "50", *CACHE)
    cache = tmp_path / "fb" / "teacher-cache"          # the default: <out>/../teacher-cache
    assert rec["cache"] == str(cache) and rec["config"]["cache"] == str(cache)
    spec, fields, _ = load_teacher_cache(cache)
    assert (spec.windows, spec.block_size, spec.top_n) == (10, 16, 8)
    assert fields["tokens"].shape == (10, 16)
    assert rec["final"]["step"] == 3 and rec["final"]["k"] == 1
    assert set(rec["final"]["val"]) == {"tau=1.0", "tau=0.7"}
    # the next stage starts from this one and keeps its draft vocabulary
    k2 = tmp_path / "fb" / "k2"
    rec = _distill(capsys, saved_tiny_model, tiny_corpus.dir, k2, "--k", "2", "--init", str(s1),
                   "--max-steps", "2", "--bf16")
    assert rec["final"]["step"] == 2 and rec["cache"] is None
    assert load_feedback(k2).draft_ids.numel() == 50


def test_distill_feedback_resume_continues_the_run(saved_tiny_model, tiny_corpus, tmp_path,
                                                   capsys):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    _distill(capsys, saved_tiny_model, tiny_corpus.dir, a, "--max-steps", "4",
             "--cache", str(cache), *CACHE)
    _distill(capsys, saved_tiny_model, tiny_corpus.dir, b, "--max-steps", "2",
             "--cache", str(cache), *CACHE)
    # a run that exists is not overwritten without --resume
    assert main(["distill", "--design", "feedback", "--teacher", str(saved_tiny_model), "--data",
                 str(tiny_corpus.dir), "--out", str(b), "--cache", str(cache), *SMALL, *CACHE]) == 1
    assert "already holds a run" in capsys.readouterr().err
    rec = _distill(capsys, saved_tiny_model, tiny_corpus.dir, b, "--max-steps", "4",
                   "--cache", str(cache), *CACHE, "--resume")
    assert rec["final"]["step"] == 4
    assert _losses(a) == _losses(b)                     # resumed exactly where it stopped


@pytest.mark.parametrize("flags, named", [
    (["--design", "feedback", "--layout", "shared"], "--layout"),
    (["--design", "feedback", "--data-free"], "--data-free"),
    (["--cache-windows", "8"], "--cache-windows"),
    (["--draft-vocab", "100"], "--draft-vocab"),
])
def test_a_flag_of_the_other_design_is_refused_by_name(capsys, tmp_path, flags, named):
    rc = main(["distill", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "o").exists()


def test_feedback_config_file_and_flags(tmp_path):
    cfg = tmp_path / "fb.json"
    cfg.write_text(json.dumps({"k": 2, "lr": 1e-3, "student": {"draft_layers": 2}}))
    args = build_parser().parse_args(["distill", "--design", "feedback", "--config", str(cfg),
                                      "--lr", "5e-3", "--max-k", "8"])
    fc = cli_distill.feedback_config(args)
    assert (fc.k, fc.lr, fc.cache) == (2, 5e-3, None)
    assert fc.student == FeedbackConfig(max_k=8, draft_layers=2)
    # unset flags leave the library's defaults; stage k=1 gets the default cache directory
    args = build_parser().parse_args(["distill", "--design", "feedback"])
    assert cli_distill.feedback_config(args) == FeedbackTrainConfig(cache="runs/teacher-cache")
    assert cli_distill.cache_options(args) == CacheOptions()


def _parse(cmd: str):
    argv = shlex.split(cmd)
    assert argv[0] == "kforcing"
    return build_parser().parse_args(argv[1:])


def test_recorded_feedback_commands_rebuild_the_configs(tmp_path, saved_tiny_model,
                                                        tiny_corpus):
    """The commands `kforcing reproduce` records for the feedback steps, parsed back by the
    real parser, give the very configs (and cache options) the steps run."""
    cfg = reproduce.ReproduceConfig(out=str(tmp_path / "run"), scale=0.01)
    st = reproduce.State(tmp_path / "state.json")
    for name, d in (("teacher", saved_tiny_model), ("data", tiny_corpus.dir),
                    ("feedback-k1", tmp_path / "f1"), ("feedback-k2", tmp_path / "f2")):
        st.data["steps"][name] = {"done": True, "result": {"dir": str(d)}}
    opts = reproduce.feedback_cache_options(cfg, st)
    assert opts.block_size == 32 and opts.windows == TokenFile(tiny_corpus.train).num_blocks(32)
    for k in reproduce.STAGE_KS:
        fc = reproduce.feedback_config(cfg, st, k)
        args = _parse(stage_command(fc, opts))
        assert args.design == "feedback" and not args.cache_only
        assert cli_distill.feedback_config(args) == fc
        if k == 1:
            assert cli_distill.cache_options(args) == opts
    args = _parse(stage_command(reproduce.feedback_config(cfg, st, 1), opts, cache_only=True))
    assert args.cache_only and cli_distill.cache_options(args) == opts


# -- data chat ------------------------------------------------------------------------------------

# in the tiny corpus's words, so that prompts stay short for a 32-token context
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}we {% endif %}{{ m['content'] }}. "
            "{% endfor %}{% if add_generation_prompt %}you {% endif %}")


@pytest.fixture
def chat_teacher(saved_tiny_model, tmp_path) -> Path:
    """The tiny model with a minimal Jinja chat template."""
    d = tmp_path / "chat-teacher"
    shutil.copytree(saved_tiny_model, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return d


def test_data_chat_writes_prompts_and_answers_and_reuses_them(chat_teacher, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    questions = ["the river", "a quiet garden", "old stone road"]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    argv = ["data", "chat", "--teacher", str(chat_teacher), "--conversations", "6",
            "--prompts", str(prompts), "--batch-size", "3", "--answer-tokens", "12",
            "--out", str(tmp_path / "chat"), "--quiet"]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    out = Path(rec["dir"])
    assert rec["conversations"] == 6 and rec["chunks"] == 2
    convs = [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]
    assert [c["question"] for c in convs] == questions * 2
    # train.bin is the rendered prompts and the answers, conversation after conversation
    cfg = {"chat_template": TEMPLATE}
    tok = load_tokenizer(out / "tokenizer.json")
    n_val = rec["validation_conversations"]
    want = "".join(render_chat(cfg, [{"role": "user", "content": c["question"]}]) + c["answer"]
                   for c in convs[n_val:])
    ids = np.asarray(TokenFile(out / "train.bin").tokens).tolist()
    assert tok.decode(ids, skip_special_tokens=True) == want
    assert len(ids) == rec["tokens"]["train"]
    stamp = (out / "corpus.json").stat().st_mtime_ns
    assert main(argv) == 0                               # a second call reuses the corpus
    assert json.loads(capsys.readouterr().out) == rec
    assert (out / "corpus.json").stat().st_mtime_ns == stamp


def test_data_chat_errors(chat_teacher, saved_tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    for teacher, prompts, named in ((chat_teacher, empty, "no prompts"),
                                    (chat_teacher, bad, '"prompt"'),
                                    (saved_tiny_model, None, "no chat template")):
        extra = ["--prompts", str(prompts)] if prompts else []
        assert main(["data", "chat", "--teacher", str(teacher), "--conversations", "2",
                     "--out", str(tmp_path / "c"), "--quiet", *extra]) == 1
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
