"""The token-feedback student through the one student loader and the command line: load,
generate (k tokens per pass and lossless), match."""

from __future__ import annotations

import json

import torch

from kforcing.cli.main import main
from kforcing.core.model import Transformer
from kforcing.decoding.generate import generate
from kforcing.io.checkpoint import load_model
from kforcing.students.feedback import FeedbackConfig, FeedbackStudent, save_feedback
from kforcing.students.store import load_student, resolve_student_dir, student_info


def _saved(saved_tiny_model, tmp_path):
    teacher = load_model(saved_tiny_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = FeedbackStudent(teacher, FeedbackConfig(max_k=4)).eval()
    return save_feedback(student, tmp_path / "fb", saved_tiny_model), student


def test_load_student_reads_a_feedback_student(saved_tiny_model, tmp_path):
    d, student = _saved(saved_tiny_model, tmp_path)
    loaded = load_student(d)
    assert isinstance(loaded, FeedbackStudent)
    assert resolve_student_dir(d) == d
    info = student_info(d)
    assert info.layout == "feedback" and info.k == 4
    a = generate(student, [[1, 2, 3]], 12, mode="lossless", k=3, seed=5)
    b = generate(loaded, [[1, 2, 3]], 12, mode="lossless", k=3, seed=5)
    ar = generate(student, [[1, 2, 3]], 12, mode="ar", seed=5)
    assert a.tokens == b.tokens == ar.tokens


def test_cli_generate_and_match_take_a_feedback_student(saved_tiny_model, tiny_corpus,
                                                        tmp_path, capsys):
    d, _ = _saved(saved_tiny_model, tmp_path)
    for flags in (["--k", "4"], ["--lossless"]):
        assert main(["generate", "--model", str(d), "--prompt", "the river", "--json",
                     "--max-new-tokens", "8", *flags]) == 0
    capsys.readouterr()
    assert main(["match", "--student", str(d), "--data", str(tiny_corpus.dir), "--windows", "8",
                 "--k", "2", "--block-size", "16"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["head"] == "feedback" and rec["tau=1.0"]["windows"] == 8
    assert rec["tau=1.0"]["per_position"][0] == 1.0
    # the training split, to tell under- from overfitting
    assert main(["match", "--student", str(d), "--data", str(tiny_corpus.dir), "--windows", "8",
                 "--k", "2", "--block-size", "16", "--split", "train"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["split"] == "train" and rec["tau=1.0"]["windows"] == 8


def test_cli_generate_verifies_a_draft_tree(saved_tiny_model, tmp_path, capsys):
    """`--tree` gives the answer the chain gives (both are the teacher's AR samples), records
    the tree, and refuses a wrong number of widths in one line."""
    d, _ = _saved(saved_tiny_model, tmp_path)
    texts = []
    for flags in (["--lossless", "--tree", "3,2,1"], ["--lossless"]):
        assert main(["generate", "--model", str(d), "--prompt", "the river", "--json",
                     "--max-new-tokens", "12", "--seed", "3", *flags]) == 0
        out = capsys.readouterr()
        texts.append(json.loads(out.out.strip().splitlines()[-1])["tokens"])
        if "--tree" in flags:
            assert json.loads(out.err.strip().splitlines()[-1])["tree"] == [3, 2, 1]
    assert texts[0] == texts[1]
    assert main(["generate", "--model", str(d), "--prompt", "x", "--lossless",
                 "--tree", "3,2"]) != 0
    assert "needs k - 1 = 3 widths" in capsys.readouterr().err


def test_cli_compile_flag_compiles_the_decoders(saved_tiny_model, tmp_path, capsys,
                                                monkeypatch):
    """generate --compile and chat --compile compile the teacher's decode graph and the draft's
    steps (stubs: the uncompiled static pass, so no C++ compiler is needed) and decode through
    them: the same tokens as without the flag."""
    d, _ = _saved(saved_tiny_model, tmp_path)
    compiled = []

    def fake_decode(self, **options):
        compiled.append("teacher")
        self.compiled_step = self.decode_static
        return self
    monkeypatch.setattr(Transformer, "compile_decode", fake_decode)
    monkeypatch.setattr(FeedbackStudent, "compile_draft",
                        lambda self: compiled.append("draft") or self)
    tokens = []
    for flags in ([], ["--compile"]):
        assert main(["generate", "--model", str(d), "--prompt", "the river", "--json", "--k",
                     "4", "--max-new-tokens", "8", "--seed", "2", *flags]) == 0
        tokens.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"])
    assert tokens[0] == tokens[1] and compiled == ["teacher", "draft"]
    assert main(["chat", "--model", str(d), "--mode", "kforcing", "--k", "4", "--prompt", "hi",
                 "--max-new-tokens", "4", "--compile"]) == 0
    assert compiled == ["teacher", "draft"] * 2
    assert "first passes compile" in capsys.readouterr().err
