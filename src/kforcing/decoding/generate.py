"""`generate`: the one entry to every decoder.

- a plain Transformer decodes autoregressively (mode "ar");
- a K-Forcing student decodes k tokens per pass (mode "kforcing", the default), proposes k
  tokens its teacher verifies (mode "lossless": the teacher's exact samples), or lets its
  teacher decode alone (mode "ar");
- k="auto" picks k for the batch size from a calibration (decoding/autok.py); when AR wins, the
  teacher decodes plain AR (for lossless that is the same output: lossless equals AR sampling).

Sampling options come as a SamplingConfig or as the temperature= / top_k= / top_p= shortcuts,
which override its fields; an option the chosen decoder cannot honour is refused in one line.
"""

from __future__ import annotations

import dataclasses

from kforcing.core.model import Transformer
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.core.tree import parse_widths
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.autok import AutoChoice, choose_k
from kforcing.decoding.common import GenerationResult, OnTokens
from kforcing.decoding.feedback import generate_feedback
from kforcing.decoding.feedback_window import compile_window
from kforcing.decoding.kforcing import generate_kforcing, warn_outside_trained_tau
from kforcing.decoding.lossless import generate_lossless
from kforcing.errors import KForcingError
from kforcing.students.feedback import FeedbackStudent
from kforcing.students.pushforward import PushForward

MODES = ("ar", "kforcing", "lossless")


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, mode: str | None = None,
             k: int | str | None = None, sampling: SamplingConfig | None = None,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, noise: NoiseStream | None = None,
             eos_id: int | None = None, stop_at_eos: bool = True,
             frequency_penalty: float = 0.0, teacher=None,
             on_tokens: OnTokens | None = None,
             tree: str | tuple[int, ...] | None = None) -> GenerationResult:
    """prompts (B lists of token ids) -> GenerationResult with B continuations.

    mode: "ar" | "kforcing" | "lossless" (default "ar" for a plain Transformer, "kforcing" for
    a student). k: tokens per pass (default the student's max_k) or "auto". noise: one seed per
    row (default rows seeded seed, seed + 1, ...): a row's text depends only on its prompt and
    its seed. teacher: a shared-layout student's teacher, needed by modes "ar" and "lossless"
    (other students hold theirs). With k="auto", extra["auto"] records the choice and why.
    on_tokens: called after every pass with each row's new tokens; may return per-row stop
    flags (decoding.common.OnTokens): what a server streams with. tree: lossless with a
    token-feedback student only, the widths of a draft tree (core.tree, e.g. "4,2,1" for k=4)
    verified in each teacher pass instead of one chain."""
    student = isinstance(model, PushForward | FeedbackStudent)
    mode = mode or ("kforcing" if student else "ar")
    if mode not in MODES:
        raise KForcingError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
    if k is not None and k != "auto" and (isinstance(k, bool) or not isinstance(k, int)):
        raise KForcingError(f"k must be a positive integer or 'auto', got {k!r}")
    if mode == "lossless" and frequency_penalty:
        raise KForcingError("lossless mode samples the teacher's exact distribution: a "
                            "frequency penalty would change it")
    sampling = _sampling(sampling, temperature, top_k, top_p, _defaults(model))
    widths = _tree_widths(tree, model, mode, k)
    if not student:
        if mode != "ar":
            raise KForcingError(f"mode '{mode}' needs a K-Forcing student; this is a plain AR "
                                "model (use mode 'ar')")
        if k not in (None, 1, "auto"):
            raise KForcingError(f"k={k} needs a K-Forcing student; this is a plain AR model")
        return generate_ar(model, prompts, max_new_tokens, sampling=sampling, seed=seed,
                           noise=noise, eos_id=eos_id, stop_at_eos=stop_at_eos,
                           frequency_penalty=frequency_penalty, on_tokens=on_tokens)
    if mode == "ar" and k not in (None, 1, "auto"):
        raise KForcingError(f"mode 'ar' decodes one token per pass; k={k} needs mode "
                            "'kforcing' or 'lossless'")
    common = {"seed": seed, "noise": noise, "eos_id": eos_id, "stop_at_eos": stop_at_eos,
              "on_tokens": on_tokens}
    choice = choose_k(model, len(prompts)) if k == "auto" and mode != "ar" else None
    if choice is not None:
        k = choice.k
    teacher = _teacher_of(model, teacher)
    # when AR wins k="auto", the teacher decodes (lossless output is AR sampling anyway); a
    # shared-layout student whose teacher is not at hand decodes its own one-token windows
    ar_wins = choice is not None and choice.k == 1 and (teacher is not None or mode == "lossless")
    if mode == "ar" or ar_wins:
        if teacher is None:
            raise KForcingError(f"mode '{mode}' with a shared-layout student needs its teacher "
                                "(teacher=..., e.g. teacher_of(student, student_dir))")
        res = generate_ar(teacher, prompts, max_new_tokens, sampling=sampling,
                          frequency_penalty=frequency_penalty, **common)
        return _record(res, choice, "ar (the teacher)")
    if isinstance(model, FeedbackStudent):
        if frequency_penalty:
            raise KForcingError("the feedback student does not take a frequency penalty")
        if mode == "kforcing":
            warn_outside_trained_tau(model, sampling.temperature)
        res = generate_feedback(model, prompts, max_new_tokens, k=k, mode=mode,
                                sampling=sampling, tree=widths, **common)
    elif mode == "lossless":
        res = generate_lossless(model, prompts, max_new_tokens, k=k, sampling=sampling,
                                teacher=teacher, **common)
    else:
        res = generate_kforcing(model, prompts, max_new_tokens, k=k, sampling=sampling,
                                frequency_penalty=frequency_penalty, **common)
    return _record(res, choice, mode)


def compile_decoders(model, teacher=None):
    """Compile what `generate` decodes through (docs/METHOD.md section 5): the AR model's
    decode graph (a plain model, or a student's teacher: the one it holds, else `teacher`) and
    a token-feedback student's draft steps (lossless windows) and whole K-Forcing windows
    (decoding.feedback_window). Returns the AR model."""
    ar_model = model if isinstance(model, Transformer) else _teacher_of(model, teacher)
    if ar_model is None:
        raise KForcingError("--compile compiles the AR decode step: this student decodes no AR "
                            "here (use it with a teacher, mode ar or --k auto)")
    ar_model.compile_decode()
    if isinstance(model, FeedbackStudent):
        model.compile_draft()
        compile_window(model)
    return ar_model


def _tree_widths(tree, model, mode: str, k) -> tuple[int, ...] | None:
    """The draft tree's widths for generate_feedback (None: the chain)."""
    if tree is None or tree == "":
        return None
    if mode != "lossless" or not isinstance(model, FeedbackStudent):
        raise KForcingError("a draft tree needs mode 'lossless' with a token-feedback "
                            "student")
    if k == "auto":
        raise KForcingError("a draft tree fixes k (one width per drafted token): give k, not "
                            "'auto'")
    k = model.config.max_k if k is None else k
    return parse_widths(tree, k) if isinstance(tree, str) else tuple(tree)


def _defaults(model) -> dict:
    """A student samples, by default, the way it was trained to: its CDF order or coupling."""
    if isinstance(model, PushForward):
        return {"cdf_order": model.config.cdf_order}
    if isinstance(model, FeedbackStudent):
        return {"coupling": model.config.coupling}
    return {}


def _sampling(sampling: SamplingConfig | None, temperature: float | None, top_k: int | None,
              top_p: float | None, defaults: dict) -> SamplingConfig:
    """One SamplingConfig from the config and the shortcuts (which override its fields)."""
    given = {name: v for name, v in (("temperature", temperature), ("top_k", top_k),
                                     ("top_p", top_p)) if v is not None}
    if sampling is None:
        return SamplingConfig(**defaults, **given)
    return dataclasses.replace(sampling, **given)


def _teacher_of(model, teacher):
    """The AR model that decodes a student's mode 'ar': the teacher it holds, else `teacher`."""
    held = model.teacher
    if held is not None and teacher is not None and teacher is not held:
        raise KForcingError("this student holds its own teacher; do not pass another one")
    return held if held is not None else teacher


def _record(res: GenerationResult, choice: AutoChoice | None, decoded: str) -> GenerationResult:
    if choice is not None:
        res.extra["auto"] = {**choice.summary(), "decoded_with": decoded}
    return res
