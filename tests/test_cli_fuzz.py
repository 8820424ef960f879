"""CLI fuzz (issue 13): every subcommand, bad values per flag.

Each case runs `kforcing.cli.main` in-process and expects either exit code 1 with exactly one
stderr line `kforcing: error: ...` that is a user error (not the "internal error" of a bug), or
an argparse usage error (exit code 2, its usage and error lines); never a traceback. Nothing may
be written: the case's output location does not exist afterwards, a file given as output is
unchanged, and the shared input files (tiny models, corpus, the corrupt copies) are untouched.

Two kinds of cases:
- every numeric flag of every subcommand, read from the parser itself, gets the values its type
  refuses (wrong type, empty, nan, inf, negative, zero where zero is out of range);
- a table per subcommand of bad paths (missing, a directory for a file, a file for a directory,
  unreadable, corrupt JSON, corrupt safetensors, corrupt tokenizer, ...) and of values that only
  the library can judge (too large for the model, unknown names, contradictions).

`-m slow` adds the sweep: every bad path against every path flag, and a check that each base
command (the valid command the bad values are put into) really succeeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kforcing.cli import common
from kforcing.cli.main import build_parser, main
from kforcing.io.checkpoint import load_model
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import save_student

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

# -- the shared inputs ---------------------------------------------------------------------------


@dataclass
class Inputs:
    root: Path
    paths: dict[str, Path]

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """(size, mtime) of every file under root: a case must leave all of them alone."""
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(self.root.rglob("*")) if p.is_file()}


def _copy_with(src: Path, dst: Path, name: str, content: bytes | None) -> Path:
    shutil.copytree(src, dst)
    if content is None:
        (dst / name).unlink()
    else:
        (dst / name).write_bytes(content)
    return dst


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, saved_tiny_model, tiny_corpus) -> Inputs:
    root = tmp_path_factory.mktemp("fuzz")
    teacher = root / "teacher"
    shutil.copytree(saved_tiny_model, teacher)
    student = root / "student"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pf = PushForward(load_model(teacher), StudentConfig(max_k=2, layout="teacher-preserving"))
    save_student(pf.eval(), student, teacher)
    data = root / "data"
    shutil.copytree(tiny_corpus.dir, data)
    texts = root / "texts"
    shutil.copytree(tiny_corpus.dir.parent / "texts", texts)
    junk = b"\x00\xffnot what it claims to be\xfe" * 8
    p = {
        "teacher": teacher, "student": student, "data": data, "texts": texts,
        "tokenizer": data / "tokenizer.json",
        "missing": root / "no" / "such" / "path",
        "empty_dir": root / "empty_dir",
        "file": root / "a_file.txt",
        "empty_file": root / "empty.txt",
        "bad_json": root / "bad.json",
        "list_json": root / "list.json",
        "typed_json": root / "typed.json",
        "junk_gguf": root / "junk.gguf",
        "unreadable": root / "unreadable.json",
        "model_bad_json": _copy_with(teacher, root / "m_json", "config.json", b'{"model": '),
        "model_bad_weights": _copy_with(teacher, root / "m_w", "model.safetensors", junk),
        "model_bad_tok": _copy_with(teacher, root / "m_tok", "tokenizer.json", b"{not json"),
        "model_no_tok": _copy_with(teacher, root / "m_notok", "tokenizer.json", None),
        "model_no_weights": _copy_with(teacher, root / "m_now", "model.safetensors", None),
        "student_bad_json": _copy_with(student, root / "s_json", "student.json", b"[1, "),
        "student_bad_weights": _copy_with(student, root / "s_w", "student.safetensors", junk),
        "data_bad_train": _copy_with(data, root / "d_train", "train.bin", b"\x01"),
        "data_empty_val": _copy_with(data, root / "d_val", "validation.bin", b""),
        "data_no_val": _copy_with(data, root / "d_noval", "validation.bin", None),
    }
    p["empty_dir"].mkdir()
    p["file"].write_text("hello\n")
    p["empty_file"].write_text("")
    p["bad_json"].write_text('{"max_steps": ')
    p["list_json"].write_text("[1, 2, 3]")
    p["typed_json"].write_text('{"lr": "fast", "batch_size": "two"}')
    p["junk_gguf"].write_bytes(junk)
    p["unreadable"].write_text("{}")
    p["unreadable"].chmod(0)
    return Inputs(root, p)


# -- cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]      # "{name}" is an input path, "{out}" the case's output location
    expect: int = 1            # 1: a one-line user error; 2: an argparse usage error
    note: str = ""
    label: str = ""            # what is bad, for the test id (default: the whole argv)

    @property
    def id(self) -> str:
        return (self.label or " ".join(self.argv)) + (f" [{self.note}]" if self.note else "")


def _subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, its parser) for every leaf subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))
            return
    yield prefix, parser


# the values each argument type refuses (at parse time: exit code 2)
REFUSED = {
    common.count: ["abc", "1.5", "", "0", "-3", "nan", "1e3"],
    common.natural: ["abc", "", "-1", "2.5"],
    common.positive: ["abc", "", "0", "-1", "nan", "inf", "-inf"],
    common.non_negative: ["abc", "", "-0.5", "nan", "inf"],
    common.finite: ["abc", "", "nan", "inf", "-inf"],
    common.k_or_auto: ["abc", "", "0", "-2", "1.5", "Auto"],
}


def numeric_cases() -> list[Case]:
    cases = []
    for words, parser in _subparsers(build_parser()):
        for action in parser._actions:
            for value in REFUSED.get(action.type, []):
                cases.append(Case((*words, f"{action.option_strings[-1]}={value}"), expect=2))
    return cases


def choice_cases() -> list[Case]:
    """A value outside a flag's choices."""
    cases = []
    for words, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if action.choices and action.option_strings:
                cases.append(Case((*words, f"{action.option_strings[-1]}=bogus"), expect=2))
    return cases


# valid commands that bad values are put into; "{out}" is where each would write
BASE: dict[str, tuple[str, ...]] = {
    "generate": ("generate", "--model", "{teacher}", "--prompt", "the river",
                 "--max-new-tokens", "3"),
    "generate-student": ("generate", "--model", "{student}", "--prompt", "the river",
                         "--max-new-tokens", "4"),
    "chat": ("chat", "--model", "{teacher}", "--prompt", "hello", "--max-new-tokens", "3"),
    "train": ("train", "--data", "{data}", "--out", "{out}", "--model", "tiny", "--max-steps",
              "2", "--block-size", "16", "--batch-size", "2", "--eval-batches", "1",
              "--quiet"),
    "distill": ("distill", "--teacher", "{teacher}", "--data", "{data}", "--out", "{out}",
                "--k", "1", "--max-k", "2", "--layout", "teacher-preserving", "--block-size",
                "16", "--windows", "4", "--batch-size", "2", "--max-steps", "2",
                "--eval-contexts", "2", "--quiet"),
    "match": ("match", "--student", "{student}", "--data", "{data}", "--windows", "8",
              "--block-size", "16"),
    "eval": ("eval", "--model", "{teacher}", "--data", "{data}", "--block-size", "16",
             "--batch-size", "2", "--max-batches", "1"),
    "bench": ("bench", "--model", "{teacher}", "--methods", "ar", "--batch-sizes", "1",
              "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--no-hf",
              "--quiet", "--out", "{out}"),
    "data prepare": ("data", "prepare", "--source", "{texts}", "--out", "{out}",
                     "--vocab-size", "300"),
    "tokenizer train": ("tokenizer", "train", "--source", "{texts}", "--vocab-size", "300",
                        "--out", "{out}"),
    "hf export": ("hf", "export", "--model", "{teacher}", "--out", "{out}"),
    "save": ("save", "{teacher}", "--out", "{out}"),
}


BARE = "<bare flag>"   # a switch, given without a value


def with_flag(base: str, flag: str, value: str | None) -> tuple[str, ...]:
    """BASE[base] with `flag` set to value (None: removed), or appended when absent."""
    argv = list(BASE[base])
    if flag in argv:
        i = argv.index(flag)
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        del argv[i:i + 1 + takes_value]
    if value is not None:
        argv += [flag] if value == BARE else [flag, value]
    return tuple(argv)


def refused_by_parser(words: tuple[str, ...], flag: str, value: str) -> bool:
    """Whether argparse itself refuses the value (its type or choices): exit code 2."""
    parser = dict(_subparsers(build_parser()))[words]
    action = next(a for a in parser._actions if flag in a.option_strings)
    if action.choices is not None and value not in action.choices:
        return True
    try:
        (action.type or str)(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return True
    return False


def bad(base: str, flag: str, value: str, expect: int = 1, note: str = "") -> Case:
    argv = with_flag(base, flag, value)
    words = tuple(argv[:2]) if argv[0] in ("data", "tokenizer", "hf") else argv[:1]
    if value != BARE and refused_by_parser(words, flag, value):
        expect = 2
    return Case(argv, expect, note, f"{base} {flag} {value!r}")


# bad paths by what the flag expects
MODEL_DIRS = ["{missing}", "{empty_dir}", "{file}", "{model_bad_json}", "{model_bad_weights}",
              "{model_bad_tok}", "{model_no_tok}", "{model_no_weights}", ""]
STUDENT_DIRS = ["{missing}", "{empty_dir}", "{file}", "{teacher}", "{student_bad_json}",
                "{student_bad_weights}", ""]
DATA_DIRS = ["{missing}", "{empty_dir}", "{file}", "{data_bad_train}", "{data_empty_val}",
             "{data_no_val}", ""]
JSON_FILES = ["{missing}", "{empty_dir}", "{bad_json}", "{list_json}", "{typed_json}",
              "{empty_file}", "{unreadable}", ""]
OUT_DIRS = ["{file}"]


def table() -> list[Case]:
    c: list[Case] = []
    # -- generate / chat
    c += [bad("generate", "--model", v) for v in MODEL_DIRS]
    c += [bad("generate-student", "--model", v) for v in ("{student_bad_json}",
                                                          "{student_bad_weights}")]
    c += [bad("generate", "--max-new-tokens", "100000", note="longer than the context"),
          bad("generate", "--k", "4", note="k on a plain model"),
          bad("generate", "--lossless", BARE, note="lossless needs a student"),
          bad("generate", "--top-p", "1.5"),
          bad("generate", "--prompt", ""),
          bad("generate", "--prompt", "the river " * 40, note="prompt longer than context"),
          bad("generate", "--device", "cuda:7"),
          bad("generate", "--device", "foo"),
          bad("generate", "--device", ""),
          bad("generate-student", "--k", "3", note="k above max_k"),
          bad("generate-student", "--top-k", "5", note="a filter a student cannot honour"),
          bad("generate-student", "--temperature", "0", note="greedy has no noise to map")]
    c += [bad("chat", "--model", v) for v in ("{missing}", "{model_bad_json}", "{file}")]
    c += [bad("chat", "--mode", "kforcing", note="kforcing mode needs a student"),
          bad("chat", "--mode", "lossless", note="lossless mode needs a student"),
          bad("chat", "--max-new-tokens", "100000")]
    # -- train
    c += [bad("train", "--data", v) for v in DATA_DIRS]
    c += [bad("train", "--config", v) for v in JSON_FILES]
    c += [bad("train", "--out", v) for v in OUT_DIRS]
    c += [bad("train", "--model", "enormous"),
          bad("train", "--model", ""),
          bad("train", "--override", "dim"),
          bad("train", "--override", "colour=red"),
          bad("train", "--override", "dim=wide"),
          bad("train", "--block-size", "100000", note="longer than the model's context"),
          bad("train", "--min-lr", "1", note="min_lr above lr"),
          bad("train", "--device", "mps")]
    # -- distill
    # distillation, benchmarks and export need no tokenizer: a teacher without one is fine
    c += [bad("distill", "--teacher", v) for v in MODEL_DIRS if "tok" not in v]
    c += [bad("distill", "--data", v) for v in DATA_DIRS]
    c += [bad("distill", "--init", v) for v in STUDENT_DIRS]
    c += [bad("distill", "--config", v) for v in JSON_FILES]
    c += [bad("distill", "--out", v) for v in OUT_DIRS]
    c += [bad("distill", "--k", "3", note="k above max_k"),
          bad("distill", "--k", "2", note="self-forcing k=2 without --init"),
          bad("distill", "--tau-min", "1.5", note="tau_min above tau_max 1"),
          bad("distill", "--tau-start", "2", note="tau_start above tau_max 1"),
          bad("distill", "--windows", "64", note="more windows than block positions"),
          bad("distill", "--block-size", "100000", note="longer than the teacher's context"),
          bad("distill", "--device", "cuda")]
    # -- match / eval
    c += [bad("match", "--student", v) for v in STUDENT_DIRS]
    # match, eval and bench read the validation split only
    c += [bad("match", "--data", v) for v in DATA_DIRS if v != "{data_bad_train}"]
    c += [bad("match", "--taus", v) for v in ("", "a,b", "nan", "0", "-1", "1,,")]
    c += [bad("match", "--k", "3", note="k above max_k"),
          bad("match", "--block-size", "100000")]
    c += [bad("eval", "--model", v) for v in MODEL_DIRS]
    c += [bad("eval", "--data", v) for v in DATA_DIRS if v != "{data_bad_train}"]
    c += [bad("eval", "--student", v) for v in ("{missing}", "{teacher}", "{student_bad_json}")]
    c += [Case(("eval", "--data", "{data}"), note="neither --model nor --student"),
          Case(("eval", "--student", "{student}", "--data", "{data}", "--k", "a,b",
                "--judge", "none")),
          Case(("eval", "--student", "{student}", "--data", "{data}", "--k", "9",
                "--judge", "none"), note="k above max_k"),
          Case(("eval", "--student", "{student}", "--data", "{data}", "--judge", "{missing}")),
          Case(("eval", "--student", "{student}", "--data", "{data}", "--judge", "none",
                "--out", "{file}"))]
    # -- bench
    c += [bad("bench", "--model", v) for v in MODEL_DIRS if "tok" not in v]
    c += [bad("bench", "--student", v) for v in STUDENT_DIRS]
    c += [bad("bench", "--data", v) for v in DATA_DIRS if v != "{data_bad_train}"]
    c += [bad("bench", "--batch-sizes", v) for v in ("", "1,x", "0", "-4", "x,")]
    c += [bad("bench", "--k", v) for v in ("x", "0", "-1", "")]
    c += [bad("bench", "--methods", v) for v in ("bogus", "", "ar,nope")]
    c += [bad("bench", "--new-tokens-at", v) for v in ("x", "1=", "1=0", "=3")]
    c += [bad("bench", "--new-tokens", "100000", note="longer than the context"),
          bad("bench", "--out", "{file}"),
          bad("bench", "--device", "mps")]
    # -- data, tokenizer
    c += [bad("data prepare", "--source", v) for v in ("{missing}", "{empty_dir}",
                                                       "{empty_file}", "", "hf:")]
    c += [bad("data prepare", "--tokenizer", v) for v in ("{missing}", "{empty_dir}",
                                                          "{bad_json}", "{file}")]
    c += [bad("data prepare", "--vocab-size", "100", note="below 257"),
          bad("data prepare", "--out", "{file}"),
          bad("data prepare", "--field", "nope")]
    c += [bad("tokenizer train", "--source", v) for v in ("{missing}", "{empty_dir}", "")]
    c += [bad("tokenizer train", "--vocab-size", "100"),
          bad("tokenizer train", "--out", "{file}/x.json", note="a file for a directory")]
    c += [Case(("data", "fetch", "nope")), Case(("data", "fetch", ""))]
    c += [Case(("fetch", "nope"), expect=2), Case(("fetch", "smollm2", "--cache", ""), expect=2),
          Case(("fetch", "smollm2", "--cache", "{file}"), note="a file for the cache directory")]
    # -- import / export / save / curves
    c += [Case(("import", v, "--out", "{out}")) for v in ("{missing}", "{empty_dir}",
                                                           "{junk_gguf}", "{file}",
                                                           "{model_bad_json}")]
    c += [Case(("hf", "import", "--src", v, "--out", "{out}")) for v in (
        "{missing}", "{empty_dir}", "{file}", "{model_bad_json}")]
    c += [bad("hf export", "--model", v) for v in MODEL_DIRS if v != "{model_no_tok}"]
    c += [bad("hf export", "--out", "{file}")]
    c += [Case(("save", v, "--out", "{out}")) for v in ("{missing}", "{empty_dir}", "{file}",
                                                         "{model_bad_json}",
                                                         "{student_bad_json}")]
    c += [Case(("save", "{teacher}", "--out", "{file}"))]
    c += [Case(("curves", v, "--out", "{out}")) for v in ("{missing}", "{empty_dir}",
                                                           "{teacher}")]
    # -- recipes: refused before any download or training
    c += [Case(("demo", "--teacher", v, "--out", "{out}")) for v in ("{missing}",
                                                                     "{model_bad_json}")]
    c += [Case(("demo", "--student", v, "--out", "{out}")) for v in ("{missing}",
                                                                     "{teacher}")]
    reproduce = ("reproduce", "--out", "{out}", "--results", "{out}/R.md", "--results-dir",
                 "{out}/results")
    c += [Case((*reproduce, "--data", v)) for v in ("{missing}", "{empty_dir}", "{file}")]
    c += [Case((*reproduce, "--teacher", v)) for v in ("{missing}", "{model_bad_json}")]
    c += [Case((*reproduce, "--students", v)) for v in ("a,b", "{missing},{missing},{missing}")]
    c += [Case((*reproduce, "--bench-batch-sizes", v)) for v in ("x", "", "0")]
    c += [Case((*reproduce, "--bench-new-tokens-at", v)) for v in ("x", "64=0")]
    c += [Case((*reproduce, "--draft", v)) for v in ("{missing}", "{file}")]
    # -- serve / bench-serve: refused before a socket is opened or a server is started
    c += [Case(("serve", "--model", v)) for v in ("{missing}", "{empty_dir}", "{file}",
                                                  "{model_bad_json}")]
    c += [Case(("bench-serve",)), Case(("bench-serve", "--model", "{teacher}", "--url",
                                        "http://127.0.0.1:9")),
          Case(("bench-serve", "--url", "http://127.0.0.1:9", "--modes", "nope"))]
    return c


def expand(argv: tuple[str, ...], inputs: Inputs, out: Path) -> list[str]:
    names = {**{k: str(v) for k, v in inputs.paths.items()}, "out": str(out)}
    return [a.format(**names) for a in argv]


def run_case(case: Case, inputs: Inputs, tmp_path: Path, capsys, monkeypatch) -> None:
    if "{unreadable}" in case.argv and ROOT_USER:
        pytest.skip("root reads files whatever their mode")
    monkeypatch.setenv("KFORCING_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)      # a default output path would land here, not in the repo
    out = tmp_path / "out"
    before = inputs.snapshot()
    try:
        rc = main(expand(case.argv, inputs, out))
    except SystemExit as e:
        rc = e.code
    stdout, err = capsys.readouterr()
    assert "Traceback" not in err
    if case.expect == 2:
        assert rc == 2, (rc, err)
        assert err.splitlines()[-1].startswith("kforcing"), err
        assert ": error: " in err.splitlines()[-1], err
    else:
        assert rc == 1, (rc, stdout, err)
        assert err.endswith("\n") and err.count("\n") == 1, err
        assert err.startswith("kforcing: error: ") and "internal error" not in err, err
    assert not out.exists(), f"{out} was written"
    assert inputs.snapshot() == before, "an input file was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["cache"]), list(tmp_path.iterdir())


CASES = numeric_cases() + choice_cases() + table()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, inputs, tmp_path, capsys, monkeypatch):
    run_case(case, inputs, tmp_path, capsys, monkeypatch)


def test_the_table_covers_every_subcommand():
    covered = {c.argv[0] if c.argv[0] not in ("data", "tokenizer", "hf") else
               " ".join(c.argv[:2]) for c in CASES}
    commands = {" ".join(words) for words, _ in _subparsers(build_parser())}
    assert commands <= covered, commands - covered


# -- the slow sweep ---------------------------------------------------------------------------

PATH_FLAGS = {("generate", "--model"), ("chat", "--model"), ("train", "--data"),
              ("train", "--config"), ("distill", "--teacher"), ("distill", "--data"),
              ("distill", "--init"), ("distill", "--config"), ("match", "--student"),
              ("match", "--data"), ("eval", "--model"), ("eval", "--data"),
              ("bench", "--model"), ("bench", "--student"), ("bench", "--data"),
              ("data prepare", "--tokenizer"), ("hf export", "--model")}
EVERY_PATH = sorted({v for group in (MODEL_DIRS, STUDENT_DIRS, DATA_DIRS, JSON_FILES)
                     for v in group} | {"{junk_gguf}", "{texts}", "{teacher}", "{student}",
                                        "{data}", "{tokenizer}"})
# every directory the fixture made holds a good tokenizer.json, except these
NO_TOKENIZER = {"{missing}", "{empty_dir}", "{file}", "{empty_file}", "{bad_json}",
                "{list_json}", "{typed_json}", "{junk_gguf}", "{unreadable}", "{texts}", "",
                "{model_bad_tok}", "{model_no_tok}"}


def valid_for(base: str, flag: str, value: str) -> bool:
    """Whether `value` is a good argument for the flag (the sweep tries only the others)."""
    if flag == "--tokenizer":
        return value not in NO_TOKENIZER
    if flag in ("--model", "--teacher"):
        # distillation, benchmarks and export need no tokenizer; export ships a good one only
        no_tokenizer_needed = {"distill": {"{model_no_tok}", "{model_bad_tok}"},
                               "bench": {"{model_no_tok}", "{model_bad_tok}"},
                               "hf export": {"{model_no_tok}"}}
        students_too = {"{student}"} if base in ("generate", "chat") else set()
        return value == "{teacher}" or value in no_tokenizer_needed.get(base, students_too)
    if flag in ("--student", "--init"):
        return value == "{student}"
    if flag == "--data":
        # match, eval and bench read the validation split only
        return value == "{data}" or (value == "{data_bad_train}"
                                     and base in ("match", "eval", "bench"))
    return False


SWEEP = [bad(base, flag, v, note="sweep") for base, flag in sorted(PATH_FLAGS)
         for v in EVERY_PATH if not valid_for(base, flag, v)]


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=[c.id for c in SWEEP])
def test_sweep_every_bad_path_against_every_path_flag(case, inputs, tmp_path, capsys,
                                                      monkeypatch):
    run_case(case, inputs, tmp_path, capsys, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(BASE))
def test_every_base_command_succeeds(base, inputs, tmp_path, capsys, monkeypatch):
    """The commands the bad values go into are valid: only the bad value makes them fail."""
    monkeypatch.setenv("KFORCING_CACHE", str(tmp_path / "cache"))
    rc = main(expand(BASE[base], inputs, tmp_path / "out"))
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert json.dumps(inputs.snapshot())   # inputs still readable
