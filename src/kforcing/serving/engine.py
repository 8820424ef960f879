"""The bridge from served requests to the decoders: load a teacher or a student with its
tokenizer and chat template, check a request's decode settings against it, choose k per batch
size (`--k auto`), and run one wave through `kforcing.decoding.generate.generate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kforcing.core.config import load_json
from kforcing.core.device import decode_weights
from kforcing.core.model import Transformer
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding import autok
from kforcing.decoding.generate import generate
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, tokenizer_path
from kforcing.io.hub import chat_template, render_chat
from kforcing.io.tokenizers import load_tokenizer
from kforcing.serving.autotune import WaveTuner
from kforcing.serving.scheduler import OnTokens, Plan, Wave, WaveKey
from kforcing.serving.schemas import APIError
from kforcing.students.feedback import (
    FEEDBACK_JSON,
    is_feedback_dir,
    load_feedback,
    resolve_feedback_dir,
)
from kforcing.students.store import (
    is_student_dir,
    load_student,
    resolve_student_dir,
    student_info,
    teacher_of,
)

log = logging.getLogger("kforcing.serve")


@dataclass
class ServedModel:
    """A model with what serving it needs. `ar_model` is what mode "ar" decodes: the model
    itself, or a student's teacher (None when a shareable shared-layout student came without
    it: then only mode "kforcing" is served)."""
    name: str
    model: torch.nn.Module
    ar_model: Transformer | None
    tokenizer: Tokenizer
    chat: dict | None                     # tokenizer_config.json holding a chat template
    eos_id: int | None
    stop_ids: frozenset[int] = frozenset()
    base_sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def kind(self) -> str:
        if isinstance(self.model, Transformer):
            return "teacher"
        return "feedback" if hasattr(self.model, "draft_config") else "student"

    @property
    def max_k(self) -> int:
        return 1 if self.kind == "teacher" else self.model.config.max_k

    @property
    def context(self) -> int:
        cfg = self.ar_model.config if self.ar_model is not None else self.model.model_config
        return cfg.max_seq_len

    @property
    def modes(self) -> tuple[str, ...]:
        if self.kind == "teacher":
            return ("ar",)
        if self.ar_model is None:
            return ("kforcing",)
        return ("ar", "kforcing", "lossless")

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's rendering; a model without one continues the messages' text
        joined by newlines (as `kforcing chat` does)."""
        if self.chat is None:
            return self.tokenizer.encode("\n".join(m["content"] for m in messages)).ids
        text = render_chat(self.chat, messages)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_served(path: str | Path, *, device: str = "cpu", name: str | None = None
                ) -> ServedModel:
    """A teacher directory, a K-Forcing student (run or shareable directory) or a feedback
    student, with its tokenizer, chat template and stop tokens."""
    path = Path(path)
    if is_feedback_dir(path):
        model = load_feedback(path, device=device)
        ar_model, tok_dir = model.teacher, resolve_feedback_dir(path)
        teacher_dir = Path(load_json(tok_dir / FEEDBACK_JSON)["teacher"])
        base = SamplingConfig(coupling=model.config.coupling)
    elif is_student_dir(path):
        model = load_student(path, device=device)
        try:
            ar_model = teacher_of(model, path)
        except KForcingError as e:
            log.warning("serving mode kforcing only: %s", e)
            ar_model = None
        tok_dir = resolve_student_dir(path)
        teacher_dir = student_info(path).teacher_dir
        base = SamplingConfig(cdf_order=model.config.cdf_order)
    else:
        model = ar_model = load_model(path, device=device)
        tok_dir, teacher_dir, base = path, None, SamplingConfig()
    for m in (model, ar_model):           # fp32, in the layout that decodes fastest here
        if m is not None:
            decode_weights(m, torch.float32)
    tok_file = tok_dir / "tokenizer.json"
    tokenizer = load_tokenizer(tok_file if tok_file.is_file() else tokenizer_path(path))
    chat = _chat_config([path, tok_dir] + ([teacher_dir] if teacher_dir else []))
    cfg = ar_model.config if ar_model is not None else model.model_config
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise KForcingError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                            f"only {cfg.vocab_size}: mismatched tokenizer in {path}")
    eos = cfg.eos_id
    stop_ids = {eos} if eos is not None else set()
    if chat and chat.get("eos_token"):
        i = tokenizer.token_to_id(chat["eos_token"])
        if i is not None:
            stop_ids.add(i)
    return ServedModel(name=name or path.resolve().name, model=model, ar_model=ar_model,
                       tokenizer=tokenizer, chat=chat, eos_id=eos, stop_ids=frozenset(stop_ids),
                       base_sampling=base)


def _chat_config(dirs: list[Path]) -> dict | None:
    """The first of these directories' tokenizer_config.json with a chat template (a student
    usually has none of its own: its teacher's)."""
    for d in dirs:
        try:
            cfg = chat_template(d)
        except KForcingError:
            cfg = None
        if cfg is not None:
            return cfg
    return None


class Engine:
    """Decodes waves for the scheduler. mode/k: the server's defaults (a request may override
    them); k "auto" picks k per batch size from the calibration in kforcing.decoding.autok,
    corrected by the tokens/s of the server's own waves (kforcing.serving.autotune)."""

    def __init__(self, served: ServedModel, *, mode: str | None = None, k: int | str | None = None,
                 autok_cache: str | Path | None = None):
        self.served = served
        self.mode = mode or ("ar" if served.kind == "teacher" else "kforcing")
        self.k = served.max_k if k is None else k
        self.autok_cache = autok_cache
        self._auto: dict[int, int] = {}       # batch-size bucket -> calibrated k
        self._tuners: dict[str, WaveTuner] = {}   # mode -> its --k auto choices
        self._warm: set[tuple[str, int]] = set()   # (mode, k) decoded at least once
        self.check(self.mode, self.k, temperature=1.0, top_p=1.0, flag=True)

    # -- requests ---------------------------------------------------------------------------------
    def check(self, mode: str, k: int | str, *, temperature: float, top_p: float,
              flag: bool = False) -> None:
        """Refuse decode settings this model cannot run (APIError 400, or KForcingError for the
        server's own flags)."""
        s = self.served
        err = (lambda msg, param: KForcingError(msg)) if flag else (
            lambda msg, param: APIError(400, msg, param))
        where = "--mode" if flag else "kforcing.mode"
        if mode not in s.modes:
            why = ("a plain AR model serves mode 'ar' only" if s.kind == "teacher" else
                   "this student's teacher is not available")
            raise err(f"{where} '{mode}' is not served for {s.name}: {why}", "kforcing.mode")
        if k != "auto" and k > s.max_k:
            raise err(f"k={k} exceeds this checkpoint's max_k={s.max_k}", "kforcing.k")
        if mode == "kforcing" and temperature == 0:
            raise err("temperature 0 (greedy) is not possible in mode 'kforcing': the student "
                      "maps noise to samples; use temperature > 0, or mode 'ar' or 'lossless'",
                      "temperature")
        if mode == "kforcing" and top_p < 1 and s.kind == "student":
            raise err(f"top_p={top_p} cannot be honoured in mode 'kforcing' (the student samples "
                      "its own distribution, unfiltered): use mode 'ar' or 'lossless'", "top_p")

    def usable_context(self, mode: str, k: int | str) -> int:
        """Prompt + new tokens must fit in this: the K-Forcing window takes k positions of the
        context, lossless 2k (proposals run ahead); "auto" reserves for max_k."""
        kk = self.served.max_k if k == "auto" else k
        reserve = {"ar": 0, "kforcing": kk, "lossless": 2 * kk}[mode]
        return self.served.context - reserve

    def describe(self) -> dict:
        s = self.served
        return {"kind": s.kind, "max_k": s.max_k, "modes": list(s.modes),
                "default_mode": self.mode, "default_k": self.k, "context": s.context,
                "chat_template": s.chat is not None, "streams_per_pass": True}

    # -- waves ------------------------------------------------------------------------------------
    def plan(self, key: WaveKey, batch_size: int) -> Plan:
        k = self.k if key.k is None else key.k
        if key.mode == "ar":
            return Plan("ar", 1)
        if k == "auto":
            k = self.tuner(key.mode).choose(batch_size)
            if k == 1 and self.served.ar_model is not None:
                # AR wins at this batch size (lossless == AR samples)
                return Plan("ar", 1, tuned=True)
            return Plan(key.mode, k, tuned=True)
        return Plan(key.mode, k)

    def tuner(self, mode: str) -> WaveTuner:
        """The `--k auto` choices of one mode, learning from its waves."""
        if mode not in self._tuners:
            self._tuners[mode] = WaveTuner(self.auto_k, self.served.max_k, mode)
        return self._tuners[mode]

    def auto_summary(self) -> dict:
        """Per mode and batch-size bucket: the calibrated k, the k chosen now and the median
        tokens/s of each arm's recent waves (GET /health)."""
        return {mode: t.summary() for mode, t in self._tuners.items()}

    def auto_k(self, batch_size: int) -> int:
        """k for this batch size (calibrated once per power-of-two bucket, cached on disk)."""
        b = autok.bucket(batch_size)
        if b not in self._auto:
            choice = autok.choose_k(self.served.model, b, cache=self.autok_cache)
            log.info("--k auto, batch %d: k=%d (%s)", b, choice.k, choice.reason)
            self._auto[b] = choice.k
        return self._auto[b]

    def warm_up(self, max_batch: int) -> None:
        """Calibrate every batch-size bucket up to max_batch before serving, so no request
        waits for a calibration."""
        if self.k != "auto" or self.served.kind == "teacher":
            return
        b = 1
        while b <= autok.bucket(max_batch):
            self.auto_k(b)
            b *= 2

    def decode(self, wave: Wave, plan: Plan, on_tokens: OnTokens) -> None:
        s, key = self.served, wave.key
        model = s.ar_model if plan.mode == "ar" else s.model
        device = next(model.parameters()).device
        sampling = SamplingConfig(temperature=key.temperature, top_p=key.top_p,
                                  cdf_order=s.base_sampling.cdf_order,
                                  coupling=s.base_sampling.coupling)
        kw = {"mode": plan.mode, "sampling": sampling, "noise": NoiseStream(wave.seeds, device),
              "eos_id": s.eos_id, "stop_at_eos": key.stop_at_eos}
        if plan.mode != "ar":
            kw["k"] = plan.k
        if plan.mode == "lossless" and s.kind == "student" and s.model.teacher is None:
            kw["teacher"] = s.ar_model
        t0 = time.perf_counter()
        res = generate(model, wave.prompts, wave.max_new_tokens, on_tokens=on_tokens, **kw)
        # a decoder's first wave pays one-time costs (allocator, kernel selection, the batch-
        # invariance probe of lossless decoding): it does not count towards --k auto
        if plan.tuned and (plan.mode, plan.k) in self._warm:
            self.tuner(key.mode).record(len(wave.prompts), plan.k, res.num_tokens,
                                        time.perf_counter() - t0)
        self._warm.add((plan.mode, plan.k))
