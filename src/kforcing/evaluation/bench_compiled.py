"""The benchmark's compiled rows (ar-compiled, kforcing-compiled): the teacher's compiled decode
graph (Transformer.compile_decode) and a feedback student's compiled draft steps and K-Forcing
windows (decoding.generate.compile_decoders), compiled once per benchmark and lent to the
models for one run at a time, so the eager rows measured in the same run never decode through
them."""

from __future__ import annotations

from collections.abc import Callable

from kforcing.decoding.common import GenerationResult
from kforcing.decoding.generate import compile_decoders
from kforcing.students.feedback import FeedbackStudent


def lend_compiled(bench, run: Callable[[int], GenerationResult]
                  ) -> Callable[[int], GenerationResult]:
    """run(n) with bench.compiled (compiled here on first use) lent to bench.teacher and, for a
    feedback student, to bench.student for the call only."""
    draft = bench.student if isinstance(bench.student, FeedbackStudent) else None
    if bench.compiled is None:
        compile_decoders(draft or bench.teacher, bench.teacher)
        bench.compiled = (bench.teacher.compiled_step,
                          *((draft.compiled_draft, draft.compiled_window) if draft else ()))
        _lend(bench.teacher, draft, (None, None, None))

    def lent(n: int) -> GenerationResult:
        _lend(bench.teacher, draft, bench.compiled)
        try:
            return run(n)
        finally:
            _lend(bench.teacher, draft, (None, None, None))
    return lent


def _lend(teacher, draft: FeedbackStudent | None, graphs: tuple) -> None:
    teacher.compiled_step = graphs[0]
    if draft is not None:
        draft.compiled_draft = graphs[1]
        object.__setattr__(draft, "compiled_window", graphs[2])   # not a submodule
