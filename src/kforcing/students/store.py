"""K-Forcing students on disk: one loader for the two directory layouts a student can have.

- a training checkpoint (written by distillation, `save_student`): `student.json` ({"student":
  StudentConfig, "teacher": teacher directory, "k", "distill", "step"}) + `student.safetensors`
  (no teacher weights: a teacher-preserving student names its teacher's directory);
- a shareable directory (written by `kforcing.save`, students/share.py): `config.json` with
  {"format": "kforcing", "kind": "student", "model", "student", "teacher": provenance} +
  `model.safetensors` (a teacher-preserving student carries its teacher under "teacher.*").

A distillation run directory (checkpoints/latest.json) stands for its newest checkpoint.
Everything that reads a student (CLI, evaluation, sharing) goes through this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kforcing.core.config import ModelConfig, from_dict, load_json
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    load_model,
    load_state,
    load_tensors,
    model_state,
    resolve_model_dir,
)
from kforcing.students.feedback import (
    FEEDBACK_JSON,
    FeedbackConfig,
    FeedbackStudent,
    load_feedback,
    resolve_feedback_dir,
)
from kforcing.students.pushforward import PushForward, StudentConfig

STUDENT_FILE, STUDENT_JSON = "student.safetensors", "student.json"
SHARED_FORMAT = "kforcing"
TEACHER_PREFIX = "teacher."


@dataclass
class StudentInfo:
    """What a student directory says about itself, without loading any weights."""

    dir: Path                     # the directory holding the student's files
    layout: str                   # "checkpoint" (student.json), "shareable" (config.json) or
                                  # "feedback" (feedback.json: the token-feedback student)
    config: StudentConfig | FeedbackConfig
    k: int | None                 # the window it was trained at, when recorded
    teacher_dir: Path | None      # its teacher's model directory, when recorded


def shared_kind(path: str | Path) -> str | None:
    """"model" or "student" for a shareable directory, None for anything else."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return cfg.get("kind") if isinstance(cfg, dict) and cfg.get("format") == SHARED_FORMAT else None


def resolve_student_dir(path: str | Path) -> Path:
    """The directory holding a student's files: path itself, or the newest checkpoint of a
    distillation run directory."""
    d = Path(path)
    if not d.exists():
        raise KForcingError(f"checkpoint not found: {path}")
    if (d / STUDENT_JSON).is_file() or (d / FEEDBACK_JSON).is_file() or \
            shared_kind(d) == "student":
        return d
    if (d / "checkpoints" / "latest.json").is_file():
        try:
            return resolve_feedback_dir(d)
        except KForcingError:
            pass
        d = resolve_model_dir(d)
        if (d / STUDENT_JSON).is_file():
            return d
    if shared_kind(d) == "model":
        raise KForcingError(f"{path} holds a plain model, not a K-Forcing student")
    raise KForcingError(f"no K-Forcing student in {path}: expected {STUDENT_JSON} (a "
                        f"distillation checkpoint) or a {CONFIG_FILE} of kind 'student' (a "
                        "directory written by kforcing.save)")


def is_student_dir(path: str | Path) -> bool:
    try:
        resolve_student_dir(path)
        return True
    except KForcingError:
        return False


def student_info(path: str | Path) -> StudentInfo:
    d = resolve_student_dir(path)
    if (d / FEEDBACK_JSON).is_file():
        meta = load_json(d / FEEDBACK_JSON)
        if not isinstance(meta, dict) or "feedback" not in meta:
            raise KForcingError(f"corrupt {d / FEEDBACK_JSON}: expected a 'feedback' section")
        cfg = from_dict(FeedbackConfig, meta["feedback"])
        teacher = Path(meta["teacher"]) if meta.get("teacher") else None
        return StudentInfo(d, "feedback", cfg, cfg.max_k, teacher)
    if (d / STUDENT_JSON).is_file():
        meta = load_json(d / STUDENT_JSON)
        return StudentInfo(d, "checkpoint", _student_config(meta, d / STUDENT_JSON),
                           meta.get("k"), Path(meta["teacher"]) if meta.get("teacher") else None)
    cfg = load_json(d / CONFIG_FILE)
    stages = (cfg.get("training") or {}).get("stages") or [{}]
    recorded = (cfg.get("teacher") or {}).get("dir")
    teacher = Path(recorded) if recorded and _is_model_dir(recorded) else None
    return StudentInfo(d, "shareable", _student_config(cfg, d / CONFIG_FILE),
                       stages[-1].get("k"), teacher)


def teacher_dir_of(path: str | Path) -> Path:
    """The model directory of a student's teacher, for either layout; a KForcingError naming
    the student when none is recorded (a shareable student carries no teacher path that exists
    on this machine: load its teacher with `teacher_of`, or pass the teacher explicitly)."""
    info = student_info(path)
    if info.teacher_dir is None:
        raise KForcingError(f"{path} records no teacher directory that exists here: pass the "
                            "teacher explicitly (--teacher)")
    return resolve_model_dir(info.teacher_dir)


def _is_model_dir(path: str | Path) -> bool:
    try:
        resolve_model_dir(path)
        return True
    except KForcingError:
        return False


def _student_config(meta: dict, source: Path) -> StudentConfig:
    if not isinstance(meta.get("student"), dict):
        raise KForcingError(f"{source} has no 'student' section")
    return from_dict(StudentConfig, meta["student"])


# -- save / load -------------------------------------------------------------------------------

def student_state(student: PushForward) -> dict[str, torch.Tensor]:
    """The student's own weights (no frozen teacher, no tied output copies)."""
    return model_state(student)


def save_student(student: PushForward, out: str | Path, teacher_dir: str | Path,
                 extra: dict | None = None) -> None:
    """A training checkpoint: weights + config; a teacher-preserving student stores no teacher
    weights, only its directory."""
    out = Path(out)
    atomic_save_tensors(out / STUDENT_FILE, student_state(student), metadata={"format": "pt"})
    atomic_write_json(out / STUDENT_JSON, {"student": asdict(student.config),
                                           "teacher": str(Path(teacher_dir).resolve()),
                                           **(extra or {})})
    tok = Path(teacher_dir) / TOKENIZER_FILE
    if tok.is_file():
        atomic_write_bytes(out / TOKENIZER_FILE, tok.read_bytes())


def load_student(path: str | Path, device: str | torch.device = "cpu"
                 ) -> PushForward | FeedbackStudent:
    """A student from any of its formats (see the module docstring), in eval mode on device."""
    d = resolve_student_dir(path)
    if (d / FEEDBACK_JSON).is_file():
        return load_feedback(d, device=device)
    if (d / STUDENT_JSON).is_file():
        meta = load_json(d / STUDENT_JSON)
        if not meta.get("teacher"):
            raise KForcingError(f"{d / STUDENT_JSON} names no teacher")
        teacher = load_model(meta["teacher"], device=device)
        student = PushForward(teacher, _student_config(meta, d / STUDENT_JSON))
        load_state(student, load_tensors(d / STUDENT_FILE), d / STUDENT_FILE)
        return student.to(device).eval()
    cfg = load_json(d / CONFIG_FILE)
    if "model" not in cfg:
        raise KForcingError(f"{d / CONFIG_FILE} has no 'model' section")
    scfg = _student_config(cfg, d / CONFIG_FILE)
    state = load_tensors(d / MODEL_FILE)
    teacher = Transformer(from_dict(ModelConfig, cfg["model"]))
    if scfg.layout == "teacher-preserving":
        load_state(teacher, {k[len(TEACHER_PREFIX):]: v for k, v in state.items()
                             if k.startswith(TEACHER_PREFIX)}, d / MODEL_FILE)
    student = PushForward(teacher, scfg)
    load_state(student, {k: v for k, v in state.items() if not k.startswith(TEACHER_PREFIX)},
               d / MODEL_FILE)
    return student.to(device).eval()


def shareable_state(student: PushForward) -> dict[str, torch.Tensor]:
    """The tensors of a shareable student: its own weights plus a teacher-preserving student's
    frozen teacher under "teacher.*", so the directory needs nothing outside it."""
    tensors = student_state(student)
    if student.teacher is not None:
        tensors.update({f"{TEACHER_PREFIX}{k}": v for k, v in model_state(student.teacher).items()})
    return tensors


def teacher_of(student: PushForward, student_dir: str | Path | None = None) -> Transformer:
    """The AR teacher behind a student: the frozen one it holds (teacher-preserving layout),
    else the teacher directory its files record (a shared-layout student's backbone is
    fine-tuned, so it is not the teacher)."""
    if student.teacher is not None:
        return student.teacher
    if student_dir is None:
        raise KForcingError("this shared-layout student holds no teacher: give its directory")
    info = student_info(student_dir)
    if info.teacher_dir is None:
        raise KForcingError(f"{student_dir} is a shared-layout student saved without its "
                            "teacher: load the teacher separately (e.g. kforcing import)")
    return load_model(info.teacher_dir, device=next(student.parameters()).device)
