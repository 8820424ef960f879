"""The `kforcing` command line: a user error is one stderr line and exit code 1, no traceback."""

from __future__ import annotations

import inspect
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kforcing
from kforcing.cli import bench as cli_bench
from kforcing.cli import distill as cli_distill
from kforcing.cli import evaluate as cli_evaluate
from kforcing.cli import generate as cli_generate
from kforcing.cli import recipes as cli_recipes
from kforcing.cli import train as cli_train
from kforcing.cli.main import build_parser, main
from kforcing.core.config import TrainConfig
from kforcing.decoding.generate import generate
from kforcing.evaluation.bench import BenchConfig
from kforcing.evaluation.evaluate import EvalConfig
from kforcing.io.checkpoint import load_model
from kforcing.recipes import reproduce
from kforcing.recipes.commands import command, config_command
from kforcing.recipes.demo import lossless_verdict
from kforcing.recipes.reproduce import ReproduceConfig
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import save_student
from kforcing.training.distill import DistillConfig

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(err: str) -> str:
    """stderr must be exactly one line starting with 'kforcing: error:'."""
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("kforcing: error: "), repr(err)
    assert "Traceback" not in err
    return err


def run_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1, (rc, out, err)
    return one_error_line(err)


@pytest.fixture
def model_copy(saved_tiny_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(saved_tiny_model, dst)
    return dst


# ----------------------------------------------------------------------------- happy paths


def test_generate_json(capsys, saved_tiny_model):
    rc = main(
        [
            "generate",
            "--model",
            str(saved_tiny_model),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["prompt"] == "hi"
    assert isinstance(row["completion"], str)
    assert 1 <= len(row["tokens"]) <= 5
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["new_tokens"] == len(row["tokens"])
    assert stats["forward_passes"] == len(row["tokens"])


def test_generate_batch_greedy_is_deterministic(capsys, saved_tiny_model):
    argv = [
        "generate",
        "--model",
        str(saved_tiny_model),
        "--prompt",
        "the river",
        "--prompt",
        "a",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--json",
    ]
    assert main(argv) == 0
    first = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert main(argv) == 0
    second = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in first] == ["the river", "a"]
    assert first == second


def test_eval_prints_finite_perplexity(capsys, saved_tiny_model, tiny_corpus):
    rc = main(
        [
            "eval",
            "--model",
            str(saved_tiny_model),
            "--data",
            str(tiny_corpus.dir),
            "--block-size",
            "16",
            "--batch-size",
            "4",
            "--max-batches",
            "2",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["split"] == "validation"
    assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


def test_train_tiny_run(capsys, tiny_corpus, tmp_path):
    out_dir = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(tiny_corpus.dir),
        "--out",
        str(out_dir),
        "--model",
        "tiny",
        "--max-steps",
        "2",
        "--warmup-steps",
        "1",
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--quiet",
    ]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["step"] == 2 and math.isfinite(last["val_loss"])
    assert (out_dir / "checkpoints" / "latest.json").is_file()
    # a run directory works as --model: its latest checkpoint and tokenizer are used
    assert main(["generate", "--model", str(out_dir), "--max-new-tokens", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["prompt"] == "The" and 1 <= len(row["tokens"]) <= 3
    # running the same command again without --resume refuses to overwrite the run
    err = run_error(capsys, argv)
    assert "already holds a run" in err and "--resume" in err


# ----------------------------------------------------------------------------- user errors


def test_missing_checkpoint(capsys, tmp_path):
    err = run_error(capsys, ["generate", "--model", str(tmp_path / "nowhere")])
    assert "checkpoint not found" in err


def test_corrupt_checkpoint_file(capsys, model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00 not a safetensors file \xff" * 10)
    err = run_error(capsys, ["generate", "--model", str(model_copy), "--prompt", "hi"])
    assert "corrupt weights file" in err and "model.safetensors" in err


def test_corrupt_config_json(capsys, model_copy):
    (model_copy / "config.json").write_text('{"model": ')
    err = run_error(capsys, ["eval", "--model", str(model_copy), "--data", "x"])
    assert "corrupt JSON" in err and "config.json" in err


def test_wrong_typed_config_value(capsys, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model"]["dim"] = "64"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    run_error(capsys, ["generate", "--model", str(model_copy), "--prompt", "hi"])


def test_missing_tokenizer(capsys, model_copy):
    (model_copy / "tokenizer.json").unlink()
    err = run_error(capsys, ["generate", "--model", str(model_copy), "--prompt", "hi"])
    assert "tokenizer.json" in err


def test_prompt_longer_than_context(capsys, saved_tiny_model):
    long_prompt = " ".join(["the river walked"] * 40)
    err = run_error(
        capsys,
        [
            "generate",
            "--model",
            str(saved_tiny_model),
            "--prompt",
            long_prompt,
            "--max-new-tokens",
            "5",
        ],
    )
    assert "exceeds the model's context of 32 tokens" in err


def test_empty_prompt(capsys, saved_tiny_model):
    err = run_error(capsys, ["generate", "--model", str(saved_tiny_model), "--prompt", ""])
    assert "prompt 0 is empty" in err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top-p", "0"),
        ("--max-new-tokens", "-2"),
        ("--k", "three"),
    ],
)
def test_bad_numbers_are_usage_errors(capsys, saved_tiny_model, flag, value):
    """A value outside a flag's range is refused before anything loads, naming the flag."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(saved_tiny_model), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected" in err and repr(value) in err
    assert "Traceback" not in err


def test_unknown_corpus_fetch(capsys, tmp_path):
    err = run_error(capsys, ["data", "fetch", "foo", "--cache", str(tmp_path)])
    assert "unknown corpus 'foo'" in err


def test_unknown_corpus_prepare(capsys, tmp_path):
    err = run_error(
        capsys, ["data", "prepare", "--source", "/no/such/path", "--cache", str(tmp_path / "cache")]
    )
    assert "unknown corpus '/no/such/path'" in err


def test_unknown_model_preset_for_train(capsys, tiny_corpus, tmp_path):
    err = run_error(
        capsys,
        [
            "train",
            "--data",
            str(tiny_corpus.dir),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "enormous",
            "--quiet",
        ],
    )
    assert "unknown model preset 'enormous'" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_without_prepared_data(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    err = run_error(
        capsys,
        [
            "train",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "tiny",
            "--quiet",
        ],
    )
    assert "no prepared corpus" in err and "train.bin" in err


def test_train_bad_override_and_config(capsys, tiny_corpus, tmp_path):
    base = [
        "train",
        "--data",
        str(tiny_corpus.dir),
        "--out",
        str(tmp_path / "run"),
        "--model",
        "tiny",
        "--quiet",
    ]
    err = run_error(capsys, [*base, "--override", "dropout"])
    assert "--override expects key=value" in err
    (tmp_path / "cfg.json").write_text('{"max_steps": 1, "bogus": 2}')
    err = run_error(capsys, [*base, "--config", str(tmp_path / "cfg.json")])
    assert "unknown field(s) bogus" in err


def test_train_unknown_override_key(capsys, tiny_corpus, tmp_path):
    err = run_error(
        capsys,
        [
            "train",
            "--data",
            str(tiny_corpus.dir),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "tiny",
            "--quiet",
            "--override",
            "colour=red",
        ],
    )
    assert "colour" in err


def test_resume_with_changed_batch_size_cli(capsys, tiny_corpus, tmp_path):
    base = [
        "train",
        "--data",
        str(tiny_corpus.dir),
        "--out",
        str(tmp_path / "run"),
        "--model",
        "tiny",
        "--max-steps",
        "2",
        "--warmup-steps",
        "1",
        "--block-size",
        "16",
        "--eval-batches",
        "1",
        "--quiet",
    ]
    assert main([*base, "--batch-size", "2"]) == 0
    capsys.readouterr()
    err = run_error(capsys, [*base, "--batch-size", "3", "--max-steps", "4", "--resume"])
    assert "cannot resume: batch_size was 2, now 3" in err


def test_console_script_missing_model():
    """The installed entry point: exit status 1, one stderr line, no traceback."""
    exe = Path(sys.executable).parent / "kforcing"
    if not exe.is_file():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run(
        [str(exe), "generate", "--model", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    one_error_line(proc.stderr)
    assert "checkpoint not found: /nonexistent" in proc.stderr


# ----------------------------------------------------------------------------- error policy


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"kforcing {kforcing.__version__}\n"


def test_a_bug_is_one_line_naming_its_log(capsys, saved_tiny_model, tmp_path, monkeypatch):
    """An unexpected exception is not shown as a user error: one line says it is a bug and
    names the log file that holds the full traceback."""

    def boom(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setenv("KFORCING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_generate, "load_with_tokenizer", boom)
    err = run_error(capsys, ["generate", "--model", str(saved_tiny_model), "--prompt", "hi"])
    assert "internal error (ZeroDivisionError: float division by zero)" in err
    logs = list((tmp_path / "cache" / "logs").glob("kforcing-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback" in text and "in boom" in text and "command: kforcing generate" in text


def test_oserror_on_a_user_path_is_one_line(capsys, saved_tiny_model, tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/some/user/file")

    monkeypatch.setenv("KFORCING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_generate, "load_with_tokenizer", denied)
    err = run_error(capsys, ["generate", "--model", str(saved_tiny_model), "--prompt", "hi"])
    assert err == "kforcing: error: Permission denied: /some/user/file\n"
    assert not (tmp_path / "cache" / "logs").exists()


@pytest.mark.parametrize(
    "device, msg",
    [
        ("foo", "unknown device 'foo'"),
        ("mps", "device 'mps' is not available"),
        ("cuda:99", "device 'cuda:99' is not available"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "train", "distill", "match", "eval", "bench"])
def test_bad_device_is_one_line(capsys, saved_tiny_model, tmp_path, command, device, msg):
    """Every command with --device checks it before doing anything (kforcing.core.device)."""
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    args = {
        "generate": ["--model", str(saved_tiny_model)],
        "train": ["--data", str(tmp_path), "--out", str(tmp_path / "run")],
        "distill": ["--teacher", str(saved_tiny_model), "--out", str(tmp_path / "run")],
        "match": ["--student", str(tmp_path), "--data", str(tmp_path)],
        "eval": ["--model", str(saved_tiny_model), "--data", str(tmp_path)],
        "bench": ["--out", str(tmp_path / "bench")],
    }[command]
    err = run_error(capsys, [command, *args, "--device", device])
    assert msg in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "bench").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_on_a_cpu_machine_is_one_line(capsys, saved_tiny_model):
    err = run_error(capsys, ["generate", "--model", str(saved_tiny_model), "--device", "cuda"])
    assert "device 'cuda' is not available" in err and "--device cpu" in err


# ----------------------------------------------------------------------------- parser vs library


def test_unset_flags_leave_the_library_defaults():
    """A flag the user does not give leaves the config at the library's own default."""
    parser = build_parser()
    assert cli_train.train_config(parser.parse_args(["train"])) == TrainConfig()
    assert cli_distill.distill_config(parser.parse_args(["distill"])) == DistillConfig()
    args = parser.parse_args(["eval", "--student", "s", "--data", "d"])
    assert cli_evaluate.eval_config(args) == EvalConfig()
    args = parser.parse_args(["bench"])
    assert cli_bench.bench_config(args) == BenchConfig()
    args = parser.parse_args(["reproduce"])
    assert cli_recipes.reproduce_config(args) == ReproduceConfig()
    args = parser.parse_args(["generate", "--model", "m"])
    defaults = inspect.signature(generate).parameters
    for name in ("k", "temperature", "top_k", "top_p", "seed", "frequency_penalty"):
        assert getattr(args, name) == defaults[name].default, name
    assert args.cdf_order is None   # the student's own order, else SamplingConfig's


def _parse(cmd: str):
    argv = shlex.split(cmd)
    assert argv[0] == "kforcing"
    return build_parser().parse_args(argv[1:])


def test_recorded_commands_rebuild_the_configs_that_ran(tmp_path, saved_tiny_model):
    """What `kforcing reproduce` records is rendered from the config it runs: parsed back by
    the real parser, each command gives that very config."""
    teacher = load_model(saved_tiny_model)
    for d in ("s1", "s2"):   # the stages the later ones start from (--init)
        student = PushForward(teacher, StudentConfig(max_k=4, layout="teacher-preserving"))
        save_student(student, tmp_path / d, saved_tiny_model)
    cfg = ReproduceConfig(out=str(tmp_path / "run"), scale=0.01, cache=str(tmp_path / "c"),
                          bench_max_seconds=12.5)
    tc = reproduce.train_config(cfg, tmp_path / "draft", "data dir", "tiny", 0.05,
                                {"max_seq_len": 512, "dropout": 0.0, "tie_embeddings": True}, 128)
    assert cli_train.train_config(_parse(config_command("train", tc))) == tc

    st = reproduce.State(tmp_path / "state.json")
    for name, d in (("teacher", "t"), ("data", "d"), ("distill-k1", "s1"), ("distill-k2", "s2")):
        st.data["steps"][name] = {"done": True, "result": {"dir": str(tmp_path / d)}}
    for k in reproduce.STAGE_KS:
        dc = reproduce.distill_config(cfg, st, k)
        assert cli_distill.distill_config(_parse(config_command("distill", dc))) == dc

    bc = reproduce.bench_config(cfg)
    args = _parse(config_command("bench", bc, model="t", student="s", out="o"))
    assert cli_bench.bench_config(args) == bc and (args.model, args.student) == ("t", "s")

    ec = EvalConfig(tau=0.9, new_tokens=7, windows=64)
    args = _parse(config_command("eval", ec, student=["a", "b c"], data="d", judge="none"))
    assert cli_evaluate.eval_config(args) == ec and args.student == ["a", "b c"]

    args = _parse(command("match", student="s", data="d", k=2, windows=16, taus=(1.0, 0.7)))
    assert (args.k, args.windows, args.taus) == (2, 16, "1.0,0.7")
    args = _parse(command("generate", model="m", prompt=["a b", "c"], k=None, seed=0))
    assert args.prompt == ["a b", "c"] and args.k is None and args.seed == 0


# ----------------------------------------------------------------------------- recipes


def test_demo_says_when_lossless_is_slower_than_ar():
    slow = lossless_verdict(1.02, lossless_tps=100.0, ar_tps=290.0)
    assert "lossless is slower than AR here (2.9x slower)" in slow
    assert "1.02 tokens per pass" in slow and "rarely matches its teacher" in slow
    fast = lossless_verdict(2.5, lossless_tps=300.0, ar_tps=150.0)
    assert fast.startswith("lossless is 2.00x as fast as AR") and "slower" not in fast


def test_make_bench_without_demo_artifacts_says_what_to_run(tmp_path):
    """`make bench` on a fresh clone: one line naming the command that makes its inputs."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [make, "-s", "-o", ".venv/.installed", f"BIN={bin_dir}", "bench"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "run `make demo` first" in proc.stderr
    assert not (tmp_path / "runs").exists()
