"""Checkpoints (save/load, atomic publishing) and the trainer (schedule, exact resume)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kforcing.core.config import TrainConfig
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    load_model,
    load_model_config,
    resolve_model_dir,
    save_model,
    tokenizer_path,
)
from kforcing.training.rundir import publish_checkpoint
from kforcing.training.teacher import Trainer, evaluate_loss, lr_at

# ----------------------------------------------------------------------------- checkpoints


def leftovers(root: Path) -> list[Path]:
    """Temp files or directories that an atomic write might leave behind."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(make_model, tmp_path, tie):
    model = make_model(seed=1, tie_embeddings=tie, eos_id=7)
    out = save_model(model, tmp_path / "m", extra={"note": "hello"})
    assert (out / MODEL_FILE).is_file() and (out / CONFIG_FILE).is_file()
    assert json.loads((out / CONFIG_FILE).read_text())["note"] == "hello"
    loaded = load_model(out)
    assert loaded.config == model.config
    assert not loaded.training
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys()
    for k in sd:
        assert torch.equal(sd[k], ld[k]), k
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(ids), loaded(ids))
    assert leftovers(tmp_path) == []


def test_save_over_existing_and_tokenizer_copy(make_model, tmp_path, tiny_corpus):
    a, b = make_model(seed=1), make_model(seed=2)
    save_model(a, tmp_path / "m")
    save_model(b, tmp_path / "m", tokenizer=tiny_corpus.tokenizer_path)
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.tok_embeddings.weight, b.tok_embeddings.weight)
    assert tokenizer_path(tmp_path / "m") == tmp_path / "m" / TOKENIZER_FILE
    assert (tmp_path / "m" / TOKENIZER_FILE).read_bytes() == tiny_corpus.tokenizer_path.read_bytes()
    # saving into the directory that already holds the tokenizer does not break it
    save_model(b, tmp_path / "m", tokenizer=tmp_path / "m" / TOKENIZER_FILE)
    assert (tmp_path / "m" / TOKENIZER_FILE).read_bytes() == tiny_corpus.tokenizer_path.read_bytes()
    assert leftovers(tmp_path) == []


def test_load_missing_dir(tmp_path):
    with pytest.raises(KForcingError, match="checkpoint not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KForcingError, match="no checkpoint in"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize("content", [b"garbage bytes" * 50, b"", b"\x01\x02"])
def test_load_corrupt_weights(make_model, tmp_path, content):
    save_model(make_model(), tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(content)
    with pytest.raises(KForcingError, match="corrupt weights file"):
        load_model(tmp_path)


def test_load_truncated_weights(make_model, tmp_path):
    save_model(make_model(), tmp_path)
    data = (tmp_path / MODEL_FILE).read_bytes()
    (tmp_path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(KForcingError, match="corrupt weights file"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "text, msg",
    [
        ('{"model": {"dim": 64,', "corrupt JSON"),
        ("\xff\xfe not json", "corrupt JSON"),
        ('{"something": 1}', "no 'model' section"),
        ('{"model": {"dim": 64, "colour": "red"}}', "unknown field.*colour"),
        ('{"model": {"dim": 65}}', "not divisible"),
    ],
)
def test_load_corrupt_config(make_model, tmp_path, text, msg):
    save_model(make_model(), tmp_path)
    (tmp_path / CONFIG_FILE).write_text(text, encoding="latin-1")
    with pytest.raises(KForcingError, match=msg):
        load_model(tmp_path)


def test_load_weights_missing_a_tensor(make_model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(make_model(), tmp_path)
    state = load_file(str(tmp_path / MODEL_FILE))
    del state["layers.1.mlp.w2.weight"]
    save_file(state, str(tmp_path / MODEL_FILE))
    with pytest.raises(KForcingError, match="does not match its config.*layers.1.mlp.w2"):
        load_model(tmp_path)


def test_load_weights_with_wrong_shapes(make_model, tmp_path):
    save_model(make_model(dim=32, intermediate_size=86), tmp_path / "small")
    save_model(make_model(), tmp_path / "m")
    (tmp_path / "m" / MODEL_FILE).write_bytes((tmp_path / "small" / MODEL_FILE).read_bytes())
    with pytest.raises(KForcingError, match="does not match its config.*size mismatch"):
        load_model(tmp_path / "m")


def test_publish_checkpoint_keeps_newest(make_model, tmp_path):
    model = make_model()
    run = tmp_path / "run"
    for step in (3, 6, 9, 12):
        final = publish_checkpoint(run, step, lambda d: save_model(model, d), keep=2)
        assert final == run / "checkpoints" / f"step-{step:07d}"
        latest = json.loads((run / "checkpoints" / "latest.json").read_text())
        assert latest == {"name": final.name, "step": step}
        assert resolve_model_dir(run) == final
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest.json", "step-0000009", "step-0000012"]
    assert leftovers(tmp_path) == []
    loaded = load_model(run)  # a run dir resolves to its latest ckpt
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)
    assert load_model_config(run) == model.config
    # republishing an existing step replaces it
    publish_checkpoint(run, 12, lambda d: (d / "marker").write_text("x"), keep=2)
    assert (run / "checkpoints" / "step-0000012" / "marker").is_file()
    assert not (run / "checkpoints" / "step-0000012" / MODEL_FILE).exists()


def test_latest_json_pointing_nowhere(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text('{"name": "step-0000009", "step": 9}')
    with pytest.raises(KForcingError, match="step-0000009"):
        load_model(tmp_path)
    (tmp_path / "checkpoints" / "latest.json").write_text('{"name": ')
    with pytest.raises(KForcingError, match="corrupt JSON"):
        load_model(tmp_path)


def test_latest_json_without_name(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text('{"step": 3}')
    with pytest.raises(KForcingError):
        resolve_model_dir(tmp_path)


def test_publish_checkpoint_failure_leaves_previous(make_model, tmp_path):
    model = make_model()
    run = tmp_path / "run"
    publish_checkpoint(run, 1, lambda d: save_model(model, d))

    def broken(d: Path) -> None:
        (d / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_checkpoint(run, 2, broken)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest.json",
        "step-0000001",
    ]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 1
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- learning rate


def test_lr_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(101)]
    # linear warmup: equal increments of lr / warmup, starting at one increment
    for s in range(10):
        assert lrs[s] == pytest.approx(1e-3 * (s + 1) / 10, rel=1e-12)
    assert lrs[9] == pytest.approx(1e-3, rel=1e-12)
    assert lrs[10] == pytest.approx(1e-3, rel=1e-12)
    # cosine decay: monotone non-increasing after warmup, min_lr at max_steps and beyond
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert lrs[100] == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(1000, cfg) == pytest.approx(1e-4, rel=1e-12)
    assert all(1e-4 - 1e-15 <= x <= 1e-3 + 1e-15 for x in lrs)
    # halfway through the decay: the midpoint
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)


def test_lr_schedule_of_a_run_shorter_than_its_warmup():
    """issue 13 item 7: the warmup shrinks to a tenth of the run; the schedule still decays."""
    cfg = TrainConfig(max_steps=30, warmup_steps=100, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(31)]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3], rel=1e-12)
    assert lrs[30] == pytest.approx(1e-4, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    smoke = TrainConfig(max_steps=3)
    assert [lr_at(s, smoke) for s in range(4)][-1] == pytest.approx(smoke.min_lr)


def test_lr_schedule_without_warmup():
    cfg = TrainConfig(max_steps=10, warmup_steps=0, lr=2e-3, min_lr=0.0)
    assert lr_at(0, cfg) == pytest.approx(2e-3)
    assert lr_at(10, cfg) == pytest.approx(0.0, abs=1e-18)


# ----------------------------------------------------------------------------- trainer


def train_cfg(corpus, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(corpus.dir),
        out_dir=str(out),
        model="tiny",
        model_overrides={"dropout": 0.1},
        block_size=16,
        batch_size=4,
        max_steps=12,
        warmup_steps=2,
        lr=3e-3,
        min_lr=3e-4,
        eval_every=4,
        eval_batches=2,
        ckpt_every=4,
        keep_checkpoints=2,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(records: list[dict]) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in records:
        if r["step"] in out:
            assert r["loss"] == out[r["step"]]  # a repeated step repeats its record
        out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def full_run(tiny_corpus, tmp_path_factory):
    """An uninterrupted 12-step run; returns (run dir, final state dict, last metrics)."""
    out = tmp_path_factory.mktemp("train") / "full"
    trainer = Trainer(train_cfg(tiny_corpus, out), progress=False)
    last = trainer.fit()
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return out, state, last


def test_uninterrupted_run_outputs(full_run, tiny_corpus):
    out, state, last = full_run
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]
    assert last["step"] == 12 and last == records[-1]
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000008", "step-0000012"]  # keep_checkpoints=2
    assert leftovers(out) == []
    # the final checkpoint is a loadable model directory holding the trained weights
    model = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.config.dropout == 0.1 and model.config.vocab_size <= 300
    assert tokenizer_path(out).read_bytes() == tiny_corpus.tokenizer_path.read_bytes()
    # the logged validation loss is what evaluate_loss reports for the saved model
    from kforcing.io.tokens import TokenFile

    val = evaluate_loss(model, TokenFile(tiny_corpus.validation), 16, 4, 2)
    assert val == pytest.approx(last["val_loss"], rel=1e-5)


def test_resume_reproduces_uninterrupted_run(full_run, tiny_corpus, tmp_path):
    full_out, full_state, full_last = full_run
    out = tmp_path / "resumed"
    cfg = train_cfg(tiny_corpus, out)
    first = Trainer(cfg, progress=False)
    last6 = first.fit(stop_after=6)
    assert first.step == 6 and last6["step"] == 6
    assert (out / "checkpoints" / "step-0000006").is_dir()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 6
    del first

    second = Trainer(cfg, resume=True, progress=False)
    assert second.step == 6
    last = second.fit()
    assert second.step == 12

    full = losses_by_step(read_metrics(full_out))
    resumed = losses_by_step(read_metrics(out))
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == full[step], step  # exact, not approximate
    assert last["loss"] == full_last["loss"]
    assert last["val_loss"] == full_last["val_loss"]
    state = second.model.state_dict()
    assert state.keys() == full_state.keys()
    for k in state:
        assert torch.equal(state[k], full_state[k]), k
    # the final checkpoints agree too
    a, b = load_model(out), load_model(full_out)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert leftovers(out) == []


def test_resume_without_dropout_rng_would_differ(full_run, tiny_corpus, tmp_path):
    """Guard for the test above: with dropout on, different RNG really changes the losses, so
    the exact match above does check that the RNG state is restored."""
    out = tmp_path / "other-seed"
    trainer = Trainer(train_cfg(tiny_corpus, out), progress=False)
    torch.manual_seed(12345)  # dropout draws from the global RNG
    trainer.fit(stop_after=2)
    full = losses_by_step(read_metrics(full_run[0]))
    mine = losses_by_step(read_metrics(out))
    assert mine[1] != full[1]


def test_new_run_into_existing_run_dir_raises(full_run, tiny_corpus):
    out = full_run[0]
    with pytest.raises(KForcingError, match="already holds a run.*--resume"):
        Trainer(train_cfg(tiny_corpus, out), progress=False)


@pytest.mark.parametrize(
    "change",
    [{"batch_size": 2}, {"block_size": 8}, {"seed": 1}, {"grad_accum": 2}, {"model": "small"}],
)
def test_resume_with_changed_settings_raises(full_run, tiny_corpus, change):
    cfg = replace(train_cfg(tiny_corpus, full_run[0]), **change)
    key = next(iter(change))
    with pytest.raises(KForcingError, match=f"cannot resume: {key} was"):
        Trainer(cfg, resume=True, progress=False)


@pytest.mark.parametrize(
    "overrides",
    [{"n_layer": 3}, {"n_layer": 1}, {"intermediate_size": 100}, {"tie_embeddings": False}],
)
def test_resume_with_changed_model_shape_raises(full_run, tiny_corpus, overrides):
    cfg = train_cfg(tiny_corpus, full_run[0], model_overrides={"dropout": 0.1, **overrides})
    with pytest.raises(KForcingError, match="cannot resume: model_overrides was"):
        Trainer(cfg, resume=True, progress=False)


def test_resume_with_nothing_to_resume(tiny_corpus, tmp_path):
    with pytest.raises(KForcingError, match="nothing to resume"):
        Trainer(train_cfg(tiny_corpus, tmp_path / "fresh"), resume=True, progress=False)


def test_trainer_input_errors(tiny_corpus, tmp_path):
    with pytest.raises(KForcingError, match="no prepared corpus"):
        Trainer(train_cfg(tiny_corpus, tmp_path / "a", data=str(tmp_path)), progress=False)
    with pytest.raises(KForcingError, match="unknown model preset"):
        Trainer(train_cfg(tiny_corpus, tmp_path / "b", model="gigantic"), progress=False)
    with pytest.raises(KForcingError, match="block_size 300 exceeds the model context 256"):
        Trainer(train_cfg(tiny_corpus, tmp_path / "c", block_size=300), progress=False)


def test_atomic_writes_leave_normal_permissions_and_no_temp_files(make_model, tmp_path):
    """Checkpoint files get the mode open() would give them (not mkstemp's 0600), so a
    shared checkpoint directory is readable by others under the usual umask."""
    import os
    import stat

    from kforcing.io.checkpoint import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        save_model(make_model(), tmp_path / "m")
    finally:
        os.umask(old)
    for f in [tmp_path / "a.json", *(tmp_path / "m").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert not list(tmp_path.rglob("*.tmp"))
