"""The chat evaluation (kforcing.evaluation.chat, `kforcing eval-chat`) on a tiny teacher with a
minimal chat template: lossless answers equal the seeded AR answers, the outputs keep the Brown
files' schemas, the packaged prompt set loads, bad prompt files are refused in one line; plus
`kforcing chat`'s status line and `kforcing eval`'s head/layout keys for every student kind."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from kforcing.cli.main import main
from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.evaluation.chat import ChatEvalConfig, chat_eval, load_prompts, write_chat_eval
from kforcing.io.checkpoint import load_model, save_model
from kforcing.io.hub import chat_template
from kforcing.io.tokenizers import eos_id
from kforcing.students.feedback import (
    FeedbackConfig,
    FeedbackStudent,
    load_feedback,
    save_feedback,
)
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import save_student

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
SMALL = ChatEvalConfig(k=3, new_tokens=10, warmup_tokens=2, samples=2)


@pytest.fixture(scope="module")
def chat_teacher(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny teacher with room for rendered chat prompts and a Jinja chat template."""
    cfg = ModelConfig.preset("tiny", vocab_size=tiny_tokenizer.get_vocab_size(), max_seq_len=256,
                             eos_id=eos_id(tiny_tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
    out = save_model(model, tmp_path_factory.mktemp("chat") / "teacher",
                     tokenizer=tiny_corpus.tokenizer_path)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "eos_token": tiny_tokenizer.id_to_token(cfg.eos_id)}))
    return out


@pytest.fixture(scope="module")
def feedback_dir(chat_teacher, tmp_path_factory) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = FeedbackStudent(load_model(chat_teacher), FeedbackConfig(max_k=4)).eval()
    return save_feedback(student, tmp_path_factory.mktemp("chat") / "fb", chat_teacher)


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in
                            enumerate(["the river was quiet", "a small green door",
                                       "she walked to the village"])))
    return path


def test_packaged_prompt_set_loads_40_prompts_with_unique_ids():
    prompts = load_prompts()
    assert len(prompts) == 40
    assert len({p.id for p in prompts}) == 40
    assert all(p.prompt and p.kind for p in prompts)


@pytest.mark.parametrize("name, content, match", [
    ("empty.jsonl", "", "no prompts"),
    ("blank.txt", "\n  \n", "no prompts"),
    ("noprompt.jsonl", '{"id": "a", "text": "hi"}\n', "\"prompt\""),
    ("notjson.jsonl", "hello\n", "not JSON"),
    ("dup.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "more than once"),
    ("prompts.csv", "a,b\n", ".jsonl"),
])
def test_bad_prompt_files_are_refused(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(KForcingError, match=match):
        load_prompts(path)


def test_txt_prompts_one_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first one\n\nsecond one\n")
    assert [p.prompt for p in load_prompts(path)] == ["first one", "second one"]


def test_feedback_chat_eval_lossless_equals_ar(chat_teacher, feedback_dir, tiny_tokenizer,
                                               tmp_path):
    student = load_feedback(feedback_dir)
    res = chat_eval(student, tiny_tokenizer, chat_template(chat_teacher),
                    load_prompts(_prompts(tmp_path)), SMALL, command="kforcing eval-chat test")
    ev, chat = res.eval, res.eval["chat"]
    assert chat["lossless_mismatches"] == 0 and chat["lossless_identical"]
    assert all(p["lossless_identical"] for p in ev["per_prompt"])
    assert chat["lossless"]["tokens_per_pass"] >= 1
    assert chat["lossless"]["per_position_match"][0] == 1.0
    assert ev["head"] == ev["layout"] == "feedback"
    entry = ev["students"][0]
    assert entry["head"] == entry["layout"] == "feedback" and entry["k"] == 3
    assert len(ev["side_by_side"]) == 2 and set(ev["side_by_side"][0]) == {
        "id", "prompt", "ar", "kforcing"}
    brown = json.loads((DOCS / "eval.json").read_text())
    assert set(brown["teacher"]) - {"samples"} <= set(ev["teacher"])
    assert {"config", "teacher", "students", "commands"} <= set(ev)
    for key in ("gen_ppl_teacher", "unigram_entropy", "distinct_2"):
        assert ev["teacher"][key] > 0 and entry[key] > 0
    schema = set(json.loads((DOCS / "bench.jsonl").read_text().splitlines()[0]))
    rows = [asdict(r) for r in res.rows]
    assert [r["method"] for r in rows] == ["ar", "lossless", "kforcing"]
    assert all(set(r) == schema and r["batch_size"] == 1 for r in rows)
    assert rows[1]["extra"]["tokens_per_pass"] >= 1 and rows[1]["k"] == 3
    assert all("load_avg_1m" in r["machine"] and "busy" in r["machine"] for r in rows)
    paths = write_chat_eval(res, tmp_path / "out")
    assert json.loads(paths["eval"].read_text())["chat"]["lossless_mismatches"] == 0
    assert len(paths["bench"].read_text().splitlines()) == 3


def test_pushforward_chat_eval_lossless_equals_ar(chat_teacher, tiny_tokenizer, tmp_path):
    teacher = load_model(chat_teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = PushForward(teacher, StudentConfig(max_k=2)).eval()
    cfg = ChatEvalConfig(k=2, new_tokens=6, warmup_tokens=2)
    res = chat_eval(student, tiny_tokenizer, chat_template(chat_teacher),
                    load_prompts(_prompts(tmp_path))[:2], cfg, teacher=teacher)
    assert res.eval["chat"]["lossless_mismatches"] == 0
    assert res.eval["head"] == "argmax" and res.eval["layout"] == "shared"


def test_cli_eval_chat_writes_eval_and_bench(feedback_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval-chat", "--student", str(feedback_dir), "--limit", "3", "--k", "2",
                 "--new-tokens", "8", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 3 and summary["lossless_mismatches"] == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["head"] == "feedback" and ev["students"][0]["trained_k"] == 4
    assert ev["commands"][0].startswith("kforcing eval-chat --student")
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"ar", "lossless", "kforcing"}
    assert rows[0]["command"] == ev["command"]


def test_cli_eval_chat_errors(feedback_dir, saved_tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["eval-chat", "--student", str(feedback_dir), "--prompts", str(empty)]) == 1
    assert "no prompts" in capsys.readouterr().err
    # a plain model is not a student
    assert main(["eval-chat", "--student", str(saved_tiny_model), "--quiet"]) == 1
    assert "no K-Forcing student" in capsys.readouterr().err
    # a teacher without a chat template
    assert main(["eval-chat", "--student", str(feedback_dir), "--teacher", str(saved_tiny_model),
                 "--quiet"]) == 1
    assert "no chat template" in capsys.readouterr().err


def test_chat_prints_tokens_per_pass_for_a_feedback_student(feedback_dir, capsys):
    for mode in ("lossless", "kforcing"):
        assert main(["chat", "--model", str(feedback_dir), "--mode", mode, "--k", "3",
                     "--prompt", "the river", "--max-new-tokens", "6"]) == 0
        status = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert status["mode"] == mode and status["tokens_per_pass"] >= 1
        assert status["tokens_per_s"] > 0


def test_eval_entries_carry_head_and_layout(chat_teacher, feedback_dir, tiny_corpus, tmp_path,
                                            capsys):
    teacher = load_model(chat_teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pf = PushForward(teacher, StudentConfig(max_k=2, layout="teacher-preserving")).eval()
    pf_dir = tmp_path / "pf"
    save_student(pf, pf_dir, chat_teacher)
    out = tmp_path / "eval.json"
    assert main(["eval", "--student", str(feedback_dir), "--student", str(pf_dir), "--k", "2",
                 "--data", str(tiny_corpus.dir), "--judge", "none", "--prompts", "2",
                 "--prompt-len", "8", "--new-tokens", "6", "--context-len", "8", "--windows",
                 "8", "--tv-contexts", "2", "--tv-draws", "8", "--quiet", "--out",
                 str(out)]) == 0
    fb, pfe = json.loads(out.read_text())["students"]
    assert fb["head"] == fb["layout"] == "feedback" and fb["first_token_match"] == 1.0
    assert fb["match_windows"] == 8 and len(fb["per_position_match"]) == 2
    assert (pfe["head"], pfe["layout"]) == ("argmax", "teacher-preserving")
