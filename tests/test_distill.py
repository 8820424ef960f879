"""Distillation: the target makers (AR rollout, noise inversion) against explicit AR loops, and
the stage runner (metrics, checkpoints, exact resume, self-forcing stages, argument checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kforcing.core.sampling import SamplingConfig, inverse_cdf, sample
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model
from kforcing.students.pushforward import StudentConfig
from kforcing.students.store import STUDENT_FILE, STUDENT_JSON, load_student
from kforcing.students.targets import ar_rollout, invert_noise
from kforcing.training.distill import DistillConfig, Distiller, stage_student_config

ORDERS = ("vocab", "sorted")
TAU = torch.tensor([1.0, 0.6], dtype=torch.float64)


@pytest.fixture(scope="module")
def teacher(saved_tiny_model):
    return load_model(saved_tiny_model).eval()


def context(teacher, n=12, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, teacher.config.vocab_size, (2, n), generator=g)


def rand_u(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- targets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_ar_rollout_k1_is_what_the_ar_sampler_draws(teacher, order):
    """Stage-1 targets: the token the AR sampler draws at each anchor from the same uniform."""
    x = context(teacher)
    N = x.shape[1]
    u = rand_u(2, N, 1)
    y = ar_rollout(teacher, x, u, TAU, torch.arange(N), order)
    assert y.shape == (2, N, 1) and y.dtype == torch.long
    with torch.no_grad():
        for t in range(N):
            logits = teacher(x[:, : t + 1])[:, -1]
            for b in range(2):
                cfg = SamplingConfig(temperature=float(TAU[b]), cdf_order=order)
                assert int(y[b, t, 0]) == int(sample(logits[b], u[b, t, 0], cfg)), (b, t)


@pytest.mark.parametrize("order", ORDERS)
def test_ar_rollout_k3_equals_explicit_ar_loop(teacher, order):
    k = 3
    x = context(teacher, seed=1)
    anchors = torch.tensor([0, 4, 8, 11])
    u = rand_u(2, anchors.numel(), k, seed=1)
    y = ar_rollout(teacher, x, u, TAU, anchors, order)
    assert y.shape == (2, anchors.numel(), k)
    with torch.no_grad():
        for m, t in enumerate(anchors.tolist()):
            seq = x[:, : t + 1]
            for j in range(k):
                logits = teacher(seq)[:, -1].float()
                probs = (logits / TAU[:, None].float()).softmax(-1)
                tok = inverse_cdf(probs, u[:, m, j], order)
                assert torch.equal(y[:, m, j], tok), (t, j)
                seq = torch.cat([seq, tok[:, None]], dim=1)




@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_invert_noise_draws_u_inside_each_data_tokens_interval(teacher, order):
    k = 3
    x = context(teacher, seed=2)
    N = x.shape[1]
    anchors = torch.arange(N - k)
    u, y = invert_noise(teacher, x, TAU, anchors, k, order, torch.Generator().manual_seed(0))
    assert u.shape == y.shape == (2, N - k, k) and u.dtype == torch.float64
    assert bool(((u >= 0) & (u < 1)).all())
    with torch.no_grad():
        probs = (teacher(x).float() / TAU.view(2, 1, 1).float()).softmax(-1)
    for i in range(k):
        assert torch.equal(y[..., i], x[:, anchors + i + 1])
        assert torch.equal(inverse_cdf(probs[:, anchors + i], u[..., i], order), y[..., i])


def test_invert_noise_uniforms_follow_the_generator(teacher):
    x = context(teacher, seed=3)
    anchors = torch.tensor([1, 5])
    a = invert_noise(teacher, x, TAU, anchors, 2, "vocab", torch.Generator().manual_seed(1))
    b = invert_noise(teacher, x, TAU, anchors, 2, "vocab", torch.Generator().manual_seed(1))
    c = invert_noise(teacher, x, TAU, anchors, 2, "vocab", torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], c[1])
    assert not torch.equal(a[0], c[0])


# -- the stage runner --------------------------------------------------------------------------


def make_cfg(saved_tiny_model, tiny_corpus, out, **kw) -> DistillConfig:
    base = dict(
        teacher=str(saved_tiny_model),
        data=str(tiny_corpus.dir),
        out_dir=str(out),
        k=1,
        student=StudentConfig(max_k=4),
        block_size=16,
        windows=4,
        batch_size=2,
        max_steps=4,
        time_budget_min=None,
        eval_every_min=0.0,
        eval_contexts=8,
        ckpt_every=2,
    )
    base.update(kw)
    return DistillConfig(**base)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


def staircase_logits(student, teacher) -> torch.Tensor:
    x = context(teacher, n=10, seed=4)
    u = rand_u(2, 10, 1, seed=4)
    with torch.no_grad():
        return student.eval().staircase_forward(x, u, TAU).logits


@pytest.fixture(scope="module")
def stage1(saved_tiny_model, tiny_corpus, tmp_path_factory):
    """An uninterrupted 4-step stage-1 run (shared layout, argmax head)."""
    out = tmp_path_factory.mktemp("distill") / "k1"
    d = Distiller(make_cfg(saved_tiny_model, tiny_corpus, out), progress=False)
    initial = {key: val.clone() for key, val in d.student.state_dict().items()}
    rec = d.fit()
    return out, d, rec, initial


def test_student_config_may_be_a_dict(saved_tiny_model, tiny_corpus, tmp_path):
    cfg = make_cfg(saved_tiny_model, tiny_corpus, tmp_path, student={"max_k": 2, "head": "argmax"})
    assert cfg.student == StudentConfig(max_k=2)
    with pytest.raises(KForcingError, match="layout"):
        make_cfg(saved_tiny_model, tiny_corpus, tmp_path, student={"layout": "bad"})
    with pytest.raises(KForcingError, match="unknown field"):
        make_cfg(saved_tiny_model, tiny_corpus, tmp_path, student={"nope": 1})


def test_stage1_metrics_and_checkpoints(stage1):
    out, d, rec, _ = stage1
    assert d.step == 4 and rec["final"] is True and rec["step"] == 4
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4, 4]
    assert recs[-1]["final"] is True
    vals = [r["val"] for r in recs if "val" in r]
    assert len(vals) == len(recs)  # eval_every_min=0: every record carries a validation
    for v in vals:
        assert set(v) == {"tau0.7", "tau1"}
        assert set(v["tau1"]) == {"first", "joint", "per_pos", "windows"}
        assert len(v["tau1"]["per_pos"]) == 1
        assert 0.0 <= v["tau1"]["joint"] <= v["tau1"]["first"] <= 1.0
    for r in recs[1:-1]:
        assert len(r["match"]) == 1 and r["loss"] > 0
    ckpts = out / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text()) == {"name": "step-0000004", "step": 4}
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000002", "step-0000004"]
    last = ckpts / "step-0000004"
    for name in (
        STUDENT_FILE,
        STUDENT_JSON,
        "trainer.safetensors",
        "trainer.json",
        "tokenizer.json",
    ):
        assert (last / name).is_file(), name
    meta = json.loads((last / STUDENT_JSON).read_text())
    assert meta["k"] == 1 and meta["step"] == 4
    assert meta["student"] == {**meta["student"], "max_k": 4, "layout": "shared"}


def test_load_student_rebuilds_the_trained_student(stage1, teacher):
    out, d, _, _ = stage1
    loaded = load_student(out)
    assert loaded.state_dict().keys() == d.student.state_dict().keys()
    for key, val in d.student.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], val), key
    assert torch.equal(staircase_logits(loaded, teacher), staircase_logits(d.student, teacher))


def test_stage1_trains_the_noise_encoder(stage1):
    _, d, _, initial = stage1
    for key, val in d.student.state_dict().items():
        if key.startswith("noise.proj."):
            assert not torch.equal(val, initial[key]), key


def test_stage1_trains_the_backbone(stage1):
    _, d, _, initial = stage1
    assert all(p.requires_grad for p in d.student.backbone.parameters())
    assert len(d.opt.param_groups[0]["params"]) == len(list(d.student.backbone.parameters()))
    assert not torch.equal(
        d.student.state_dict()["backbone.layers.0.attn.wqkv.weight"],
        initial["backbone.layers.0.attn.wqkv.weight"],
    )


def test_resume_equals_uninterrupted_run(stage1, saved_tiny_model, tiny_corpus, tmp_path):
    out_a, d_a, _, _ = stage1
    cfg = make_cfg(saved_tiny_model, tiny_corpus, tmp_path / "b")
    first = Distiller(cfg, progress=False)
    first.fit(stop_after=2)
    assert first.step == 2
    assert json.loads((tmp_path / "b/checkpoints/latest.json").read_text())["step"] == 2
    resumed = Distiller(cfg, resume=True, progress=False)
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 4
    sa, sb = d_a.student.state_dict(), resumed.student.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # the training records of both runs agree step by step
    train_a = {r["step"]: (r["loss"], r["match"]) for r in read_metrics(out_a) if "loss" in r}
    train_b = {
        r["step"]: (r["loss"], r["match"]) for r in read_metrics(tmp_path / "b") if "loss" in r
    }
    assert train_a == train_b and sorted(train_a) == [1, 2, 3, 4]


def test_existing_run_needs_resume(stage1, saved_tiny_model, tiny_corpus):
    out, _, _, _ = stage1
    with pytest.raises(KForcingError, match="resume"):
        Distiller(make_cfg(saved_tiny_model, tiny_corpus, out), progress=False)


def test_resume_with_nothing_to_resume_raises(saved_tiny_model, tiny_corpus, tmp_path):
    with pytest.raises(KForcingError, match="nothing to resume"):
        Distiller(make_cfg(saved_tiny_model, tiny_corpus, tmp_path), resume=True, progress=False)


def test_self_forcing_stage2_from_stage1(stage1, saved_tiny_model, tiny_corpus, tmp_path):
    out1, _, _, _ = stage1
    cfg = make_cfg(saved_tiny_model, tiny_corpus, tmp_path, k=2, init=str(out1), max_steps=2)
    d = Distiller(cfg, progress=False)
    # initialised from the stage-1 student, which also serves (frozen) as the target maker
    s1 = load_student(out1).state_dict()
    for key, val in d.student.state_dict().items():
        assert torch.equal(val, s1[key]), key
    assert d.prev is not None and not any(p.requires_grad for p in d.prev.parameters())
    rec = d.fit()
    assert d.step == 2 and len(rec["val"]["tau1"]["per_pos"]) == 2
    meta = json.loads((tmp_path / "checkpoints/step-0000002" / STUDENT_JSON).read_text())
    assert meta["k"] == 2
    # the frozen previous stage did not move
    for key, val in d.prev.state_dict().items():
        assert torch.equal(val, s1[key]), key


@pytest.mark.parametrize("target", ["ar-rollout", "noise-inversion"])
def test_other_target_stages_run(saved_tiny_model, tiny_corpus, tmp_path, target):
    cfg = make_cfg(saved_tiny_model, tiny_corpus, tmp_path, k=2, target=target, max_steps=2)
    d = Distiller(cfg, progress=False)
    assert d.prev is None
    rec = d.fit()
    assert d.step == 2 and rec["final"] is True
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 1, 2, 2]
    assert all(len(r["match"]) == 2 for r in recs if "match" in r)


def test_teacher_preserving_stage_saves_no_teacher(
    saved_tiny_model, tiny_corpus, tmp_path, teacher
):
    cfg = make_cfg(
        saved_tiny_model,
        tiny_corpus,
        tmp_path,
        max_steps=2,
        student=StudentConfig(max_k=2, layout="teacher-preserving"),
    )
    d = Distiller(cfg, progress=False)
    d.fit()
    loaded = load_student(tmp_path)
    assert loaded.config.layout == "teacher-preserving"
    assert not any(key.startswith("teacher.") for key in loaded.state_dict())
    for key, val in teacher.state_dict().items():
        assert torch.equal(loaded.teacher.state_dict()[key], val), key
    assert torch.equal(staircase_logits(loaded, teacher), staircase_logits(d.student, teacher))


def test_inverse_cdf_stage1_runs(saved_tiny_model, tiny_corpus, tmp_path):
    cfg = make_cfg(
        saved_tiny_model,
        tiny_corpus,
        tmp_path,
        max_steps=2,
        student=StudentConfig(max_k=2, head="inverse-cdf"),
    )
    d = Distiller(cfg, progress=False)
    rec = d.fit()
    assert d.step == 2 and len(rec["val"]["tau1"]["per_pos"]) == 1


def test_self_forcing_k2_without_init_raises(saved_tiny_model, tiny_corpus, tmp_path):
    with pytest.raises(KForcingError, match="needs --init") as e:
        Distiller(make_cfg(saved_tiny_model, tiny_corpus, tmp_path, k=2), progress=False)
    assert "\n" not in str(e.value)


def test_self_forcing_must_double_k(stage1, saved_tiny_model, tiny_corpus, tmp_path):
    out1, _, _, _ = stage1
    with pytest.raises(KForcingError, match="doubles k") as e:
        Distiller(
            make_cfg(saved_tiny_model, tiny_corpus, tmp_path, k=4, init=str(out1)), progress=False
        )
    assert "\n" not in str(e.value)


def test_stage_must_keep_layout_and_head(stage1, saved_tiny_model, tiny_corpus, tmp_path):
    out1, _, _, _ = stage1
    cfg = make_cfg(
        saved_tiny_model,
        tiny_corpus,
        tmp_path,
        k=2,
        init=str(out1),
        student=StudentConfig(max_k=4, layout="teacher-preserving"),
    )
    with pytest.raises(KForcingError, match="layout and head") as e:
        Distiller(cfg, progress=False)
    # both values are named
    assert "layout 'teacher-preserving' here, 'shared' in" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tp_stage1(saved_tiny_model, tiny_corpus, tmp_path_factory):
    """A 1-step stage-1 run of a teacher-preserving, inverse-cdf, sorted-CDF student."""
    out = tmp_path_factory.mktemp("distill") / "tp-k1"
    student = StudentConfig(max_k=4, layout="teacher-preserving", head="inverse-cdf",
                            cdf_order="sorted")
    Distiller(make_cfg(saved_tiny_model, tiny_corpus, out, max_steps=1, student=student),
              progress=False).fit()
    return out, student


def test_stage_with_init_inherits_layout_and_head(tp_stage1, saved_tiny_model, tiny_corpus,
                                                  tmp_path):
    """issue 13 item 6: `distill --k 2 --init DIR` without repeating --layout / --head."""
    init, trained = tp_stage1
    cfg = stage_student_config(str(init), {})
    assert cfg == trained
    assert stage_student_config(str(init), {"max_k": 2}) == StudentConfig(
        **{**trained.__dict__, "max_k": 2})
    assert stage_student_config(None, {"head": "inverse-cdf"}) == StudentConfig(head="inverse-cdf")
    d = Distiller(make_cfg(saved_tiny_model, tiny_corpus, tmp_path, k=2, init=str(init),
                           max_steps=1, student=cfg), progress=False)
    assert d.student.config == trained and d.student.teacher is d.prev.teacher


@pytest.mark.parametrize("flags, named", [
    ({"layout": "shared"}, "layout 'shared' here, 'teacher-preserving' in"),
    ({"head": "argmax"}, "head 'argmax' here, 'inverse-cdf' in"),
    ({"cdf_order": "vocab"}, "cdf_order 'vocab' here, 'sorted' in"),
])
def test_stage_with_init_refuses_a_contradicting_flag(tp_stage1, flags, named):
    init, _ = tp_stage1
    with pytest.raises(KForcingError, match="layout and head") as e:
        stage_student_config(str(init), flags)
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"k": 5}, "max_k"),
        ({"k": 0}, "max_k"),
        ({"target": "bad"}, "target"),
        ({"tau_min": 0.0}, "tau"),
        ({"pos_weights": [1.0, 2.0]}, "pos_weights"),
        ({"windows": 17}, "windows"),
        ({"tau_max": float("inf")}, "tau"),
        ({"tau_min": float("nan")}, "tau"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": "fast"}, "lr must be float"),
        ({"batch_size": "two"}, "batch_size must be int"),
        ({"time_budget_min": 0.0}, "time_budget_min"),
        ({"max_steps": 0}, "max_steps"),
        ({"eval_every_min": -1.0}, "eval_every_min"),
        ({"block_size": 1, "windows": 1}, "block_size"),
    ],
)
def test_distill_config_rejects(saved_tiny_model, tiny_corpus, tmp_path, kw, msg):
    with pytest.raises(KForcingError, match=msg):
        make_cfg(saved_tiny_model, tiny_corpus, tmp_path, **kw)


@pytest.mark.parametrize("order", ORDERS)
def test_exact_k1_map_gives_ar_rollout_targets_for_k2(
    saved_tiny_model, tiny_corpus, tmp_path, order
):
    """teacher-preserving + inverse-cdf: the untrained k=1 student is the teacher's own sampler,
    so the self-forcing k=2 targets (two passes of it) are exact AR rollouts."""
    cfg = make_cfg(
        saved_tiny_model,
        tiny_corpus,
        tmp_path,
        k=2,
        max_steps=2,
        student=StudentConfig(
            max_k=2, layout="teacher-preserving", head="inverse-cdf", cdf_order=order
        ),
    )
    d = Distiller(cfg, progress=False)
    assert d.prev is not None
    x = context(d.teacher, n=16, seed=5)
    anchors, u, tau, y = d._batch(x, torch.Generator().manual_seed(0), 4)
    assert torch.equal(y, ar_rollout(d.teacher, x, u, tau, anchors, order))
    rec = d.fit()
    assert d.step == 2 and len(rec["val"]["tau1"]["per_pos"]) == 2


@pytest.mark.parametrize("order", ORDERS)
def test_match_rates_of_a_perfect_map_are_one(teacher, tiny_corpus, order):
    """teacher-preserving + inverse-cdf at k=1 samples exactly like the teacher: match 1.0,
    while a shared argmax student with a random noise encoder does not."""
    from kforcing.evaluation.match import build_match_set, match_rates
    from kforcing.io.tokens import TokenFile
    from kforcing.students.pushforward import PushForward

    split = TokenFile(tiny_corpus.validation)
    mset = build_match_set(teacher, split, k=1, block_size=16, n_windows=32,
                           taus=[1.0, 0.7], order=order)
    perfect = PushForward(teacher, StudentConfig(layout="teacher-preserving",
                                                 head="inverse-cdf", cdf_order=order))
    rates = match_rates(perfect, mset)
    assert set(rates) == {"tau1", "tau0.7"}
    for r in rates.values():
        assert r["first"] == r["joint"] == 1.0 and r["windows"] == mset.u.shape[0] * 8
    torch.manual_seed(0)
    rough = PushForward(teacher, StudentConfig(cdf_order=order))
    assert match_rates(rough, mset)["tau1"]["first"] < 1.0
