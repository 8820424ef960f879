"""What a benchmark decodes: its prompts (held-out text or random tokens) and its models
(a teacher, a student of it, a draft for HF assisted generation)."""

from __future__ import annotations

from pathlib import Path

import torch

from kforcing.core.config import ModelConfig
from kforcing.core.device import decode_weights
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model
from kforcing.io.tokens import TokenFile
from kforcing.students.feedback import is_feedback_dir, load_feedback
from kforcing.students.store import load_student, teacher_of


def make_prompts(batch_size: int, prompt_len: int, vocab: int, data: str | Path | None = None,
                 seed: int = 0) -> list[list[int]]:
    """Held-out text (validation split of a prepared corpus) when given, else random tokens.
    Speed does not depend on content, but lossless and assisted acceptance rates do."""
    g = torch.Generator().manual_seed(seed)
    if data is not None:
        tokens = TokenFile(Path(data) / "validation.bin")
        n = tokens.num_blocks(prompt_len)
        if n == 0:
            raise KForcingError(f"validation split of {data} is shorter than one prompt")
        idx = torch.randint(0, n, (batch_size,), generator=g).tolist()
        return [[int(t) for t in tokens.block(i, prompt_len)[:prompt_len]] for i in idx]
    return torch.randint(0, vocab, (batch_size, prompt_len), generator=g).tolist()


def ready_models(teacher: Transformer, student, draft: Transformer | None, dtype: torch.dtype,
                 layout: str, prompt_len: int, new_tokens: int):
    """(teacher, student, draft) cast to the benchmarked dtype with their weights in `layout`
    (core.device.decode_weights), in place, once the student is known to be the teacher's and
    a row's prompt and new tokens to fit the context."""
    mcfg = teacher.config
    if student is not None and student.model_config != mcfg:
        raise KForcingError("the student's backbone differs from the teacher's architecture: "
                            "benchmark a student against its own teacher")
    need = prompt_len + new_tokens + (2 * student.config.max_k if student else 0)
    if need > mcfg.max_seq_len:
        raise KForcingError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the "
                            f"model's context {mcfg.max_seq_len}")
    return tuple(None if m is None else decode_weights(m, dtype, layout).eval()
                 for m in (teacher, student, draft))


def load_models(model: str | None, student: str | None, draft: str | None):
    """(teacher, student, draft): the teacher defaults to the one the student was distilled
    from (a token-feedback student's directory works too); with neither, a random `small`
    model (speed does not depend on the weights)."""
    kf = teach = None
    if student and is_feedback_dir(student):     # holds its teacher: share it, do not copy
        kf = load_feedback(student, teacher=load_model(model) if model else None)
        return kf.teacher, kf, load_model(draft) if draft else None
    if student:
        kf = load_student(student)
        teach = teacher_of(kf, student) if not model else None
    if model:
        teach = load_model(model)
    if teach is None:
        torch.manual_seed(0)
        teach = Transformer(ModelConfig.preset("small")).eval()
    return teach, kf, load_model(draft) if draft else None
