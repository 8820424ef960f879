"""Students on disk: one loader for both layouts (training checkpoint, shareable directory), the
teacher a student records, and the one weight loader (tied embeddings re-tied once)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, load_state, model_state, save_model
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.share import load, save
from kforcing.students.store import (
    STUDENT_JSON,
    is_student_dir,
    load_student,
    resolve_student_dir,
    save_student,
    student_info,
    student_state,
    teacher_dir_of,
    teacher_of,
)

LAYOUTS = [("shared", "argmax"), ("teacher-preserving", "inverse-cdf")]


def make_student(teacher_dir: Path, layout: str, head: str) -> PushForward:
    teacher = load_model(teacher_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        student = PushForward(teacher, StudentConfig(max_k=2, layout=layout, head=head))
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return student.eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(params=LAYOUTS, ids=[lay for lay, _ in LAYOUTS])
def saved(request, saved_tiny_model, tmp_path):
    """(student, its training-checkpoint directory, its shareable directory)."""
    layout, head = request.param
    student = make_student(saved_tiny_model, layout, head)
    ckpt = tmp_path / "ckpt"
    save_student(student, ckpt, saved_tiny_model, extra={"k": 2})
    shared = save(ckpt, tmp_path / "shared")
    return student, ckpt, shared


def test_one_loader_reads_both_layouts(saved):
    student, ckpt, shared = saved
    for d in (ckpt, shared):
        assert is_student_dir(d) and resolve_student_dir(d) == d
        loaded = load_student(d)
        assert loaded.config == student.config
        assert same_weights(loaded, student)
        if student.teacher is not None:
            assert same_weights(loaded.teacher, student.teacher)
        # tied output re-tied: one tensor, not a copy
        assert loaded.backbone.output.weight is loaded.backbone.tok_embeddings.weight
        assert same_weights(load(d), student)            # kforcing.load reads both too


def test_student_info_and_teacher_dir_for_both_layouts(saved, saved_tiny_model):
    student, ckpt, shared = saved
    a, b = student_info(ckpt), student_info(shared)
    assert (a.layout, b.layout) == ("checkpoint", "shareable")
    assert a.config == b.config == student.config
    assert a.k == 2
    assert teacher_dir_of(ckpt) == teacher_dir_of(shared) == saved_tiny_model.resolve()
    # the teacher either layout leads to is the teacher the student was made from
    teacher = load_model(saved_tiny_model)
    for d in (ckpt, shared):
        assert same_weights(teacher_of(load_student(d), d), teacher)


def test_shareable_student_without_a_teacher_dir_here(saved, tmp_path):
    student, _, shared = saved
    cfg = json.loads((shared / "config.json").read_text())
    cfg["teacher"]["dir"] = str(tmp_path / "elsewhere")     # made on another machine
    (shared / "config.json").write_text(json.dumps(cfg))
    assert student_info(shared).teacher_dir is None
    with pytest.raises(KForcingError, match="pass the teacher") as e:
        teacher_dir_of(shared)
    assert "\n" not in str(e.value)
    loaded = load_student(shared)
    if student.teacher is not None:      # it carries its teacher: nothing outside is needed
        assert teacher_of(loaded, shared) is loaded.teacher
    else:
        with pytest.raises(KForcingError, match="saved without its teacher"):
            teacher_of(loaded, shared)


def test_a_run_directory_stands_for_its_newest_checkpoint(saved, tmp_path):
    student, ckpt, _ = saved
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt.rename(run / "checkpoints" / "step-0000003")
    (run / "checkpoints" / "latest.json").write_text('{"name": "step-0000003", "step": 3}')
    assert resolve_student_dir(run) == run / "checkpoints" / "step-0000003"
    assert same_weights(load_student(run), student)


def test_neither_layout_is_a_clear_error(saved_tiny_model, tmp_path):
    with pytest.raises(KForcingError, match="plain model, not a K-Forcing student"):
        load_student(save(saved_tiny_model, tmp_path / "model"))
    (tmp_path / "empty").mkdir()
    for path, msg in [(tmp_path / "empty", "no K-Forcing student"),
                      (saved_tiny_model, "no K-Forcing student"),
                      (tmp_path / "missing", "checkpoint not found")]:
        with pytest.raises(KForcingError, match=msg) as e:
            load_student(path)
        assert "\n" not in str(e.value)
        assert not is_student_dir(path)


def test_corrupt_student_files_are_named(saved):
    _, ckpt, shared = saved
    (ckpt / STUDENT_JSON).write_text("{not json")
    with pytest.raises(KForcingError, match="corrupt JSON"):
        load_student(ckpt)
    (shared / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(KForcingError, match="corrupt weights"):
        load_student(shared)


def test_student_state_holds_only_the_students_own_weights(saved):
    student, _, _ = saved
    state = student_state(student)
    assert "backbone.output.weight" not in state            # tied: stored once
    assert not any(k.startswith("teacher.") for k in state)
    assert set(state) | {"backbone.output.weight"} == set(student.state_dict())


@pytest.mark.parametrize("tie", [True, False])
def test_one_weight_loader_for_models_and_students(make_model, tie):
    model = make_model(tie_embeddings=tie)
    other = make_model(seed=1, tie_embeddings=tie)
    load_state(other, model_state(model), "test")
    assert same_weights(other, model)
    assert (other.output.weight is other.tok_embeddings.weight) == tie
    with pytest.raises(KForcingError, match="does not match its config"):
        load_state(other, {**model_state(model), "extra.weight": torch.zeros(1)}, "test")


def test_model_card_names_a_locally_trained_teacher(saved, saved_tiny_model):
    """issue 13 item 11: the card said `teacher source | kforcing:  |`."""
    _, _, shared = saved
    card = (shared / "README.md").read_text()
    assert f"| teacher source | kforcing: {saved_tiny_model.name} |" in card
    assert ":  |" not in card


def test_no_module_imports_a_private_name_of_another():
    """share.py used to import distill's private `_student_state`."""
    root = Path(__file__).parents[1] / "src" / "kforcing"
    bad = []
    for sub in ("core", "io", "students", "training"):
        for f in (root / sub).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kforcing"):
                    bad += [f"{f.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []


def test_save_model_then_load_student_of_it_refuses(saved_tiny_model, tmp_path):
    save_model(load_model(saved_tiny_model), tmp_path / "m")
    with pytest.raises(KForcingError, match="no K-Forcing student"):
        resolve_student_dir(tmp_path / "m")
