"""The `kforcing` command line: a user error is one stderr line and exit code 1, no traceback."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kforcing.cli.main import main


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


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--max-new-tokens", "-2"], "max_new_tokens must be >= 0"),
        (["--prompt", ""], "prompt 0 is empty"),
    ],
)
def test_bad_generate_options(capsys, saved_tiny_model, extra, msg):
    err = run_error(capsys, ["generate", "--model", str(saved_tiny_model), *extra])
    assert msg in err


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
    err = run_error(capsys, [*base, "--warmup-steps", "5", "--max-steps", "5"])
    assert "warmup_steps must be smaller than max_steps" in err


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
