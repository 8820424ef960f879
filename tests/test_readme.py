"""README.md runs as written: its library snippet on a tiny teacher and student, and every
`kforcing ...` line of its command-line section through the real parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from kforcing.cli.main import build_parser, main
from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.io.checkpoint import save_model
from kforcing.io.tokenizers import eos_id
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import save_student

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_block(title: str, lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", section(title), flags=re.S)
    assert len(blocks) == 1, f"expected one {lang} block under '## {title}'"
    return blocks[0]


def cli_lines() -> list[list[str]]:
    """Each `kforcing ...` command of the CLI block as argv (comments and `\\` joined away)."""
    text = code_block("Command line", "bash").replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in text.splitlines()]
    return [argv[1:] for argv in lines if argv and argv[0] == "kforcing"]


@pytest.fixture
def readme_models(tiny_corpus, tiny_tokenizer, tmp_path) -> dict[str, Path]:
    """A tiny teacher (context 128: the snippet asks for 64 new tokens) and an untrained
    teacher-preserving k=4 student of it, saved where the snippet's paths point."""
    cfg = ModelConfig.preset("tiny", vocab_size=tiny_tokenizer.get_vocab_size(),
                             max_seq_len=128, eos_id=eos_id(tiny_tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = Transformer(cfg).eval()
        student = PushForward(teacher, StudentConfig(max_k=4, layout="teacher-preserving"))
    save_model(teacher, tmp_path / "teacher", tokenizer=tiny_corpus.tokenizer_path)
    save_student(student.eval(), tmp_path / "student", tmp_path / "teacher")
    return {"runs/teacher-small": tmp_path / "teacher",
            "runs/demo/student-k4": tmp_path / "student",
            "shared/my-student": tmp_path / "shared"}


def test_library_snippet_runs(readme_models, capsys):
    code = code_block("Library", "python")
    for path, real in readme_models.items():
        assert f'"{path}"' in code, path
        code = code.replace(f'"{path}"', repr(str(real)))
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()   # text (may hold newlines), passes, per pass
    assert out[-2].isdigit() and 1 <= int(out[-2]) <= 16
    assert float(out[-1]) >= 1.0
    assert (readme_models["shared/my-student"] / "config.json").is_file()


def test_cli_lines_parse():
    """Every command the README shows names a real subcommand and real flags."""
    parser = build_parser()
    lines = cli_lines()
    assert len(lines) >= 20
    for argv in lines:
        # "kforcing train ... --resume": an elided part, not a flag's value ("--prompt ...")
        argv = [a for i, a in enumerate(argv) if a != "..." or argv[i - 1].startswith("-")]
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            # `--version` exits 0; anything else is a line the parser refuses
            assert e.code == 0 and argv == ["--version"], argv


def test_cli_subcommands_have_help(capsys):
    commands = set()
    for argv in cli_lines():
        words = [a for a in argv if not a.startswith("-")][:2]
        if words:
            commands.add(tuple(words[:2] if words[0] in ("data", "tokenizer", "hf") else
                               words[:1]))
    assert {("generate",), ("distill",), ("bench",), ("data", "prepare")} <= commands
    for words in sorted(commands):
        with pytest.raises(SystemExit) as e:
            main([*words, "--help"])
        assert e.value.code == 0, words
    capsys.readouterr()
