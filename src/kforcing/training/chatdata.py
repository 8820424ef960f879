"""A chat corpus written by the teacher itself: what a draft for an instruct model trains on.

An instruct teacher is decoded on chat answers, so its draft should learn on chat answers, and
the answers must be the teacher's own (EAGLE regenerates its training responses with the target
model for the same reason). Questions come from a prompt list when one is given, or else from
the teacher: fed the chat template up to the start of a user turn, an instruct model writes a
user question itself (the "Magpie" trick of Xu et al., 2024), so no data set is needed.

Each conversation is the template-rendered [system, user] prompt, then the teacher's answer
sampled at `temperature` up to and including its end-of-turn token (or cut at answer_tokens).
Questions that do not end within question_tokens are dropped (rambling text, not questions).
Work is done in chunks of batch_size conversations, each written atomically, so an interrupted
run keeps what it made, and several processes can share the chunks (`chunks=range(...)`).
The result reads like a prepared corpus: train.bin / validation.bin (conversations
concatenated), tokenizer.json, corpus.json, and conversations.jsonl with the texts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kforcing.core.config import load_json
from kforcing.core.model import Transformer
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    atomic_write_bytes,
    atomic_write_json,
    resolve_model_dir,
)
from kforcing.io.hub import TOKENIZER_CONFIG, render_chat
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import write_token_file

_MARK = "\x00question\x00"


class ChatTemplate:
    """The teacher's chat template as token ids: the prefix that opens a user turn, and whole
    [user] prompts ending in the assistant header."""

    def __init__(self, teacher_dir: str | Path):
        teacher_dir = resolve_model_dir(teacher_dir)
        cfg_path = teacher_dir / TOKENIZER_CONFIG
        cfg = load_json(cfg_path) if cfg_path.is_file() else {}
        if not cfg.get("chat_template"):
            raise KForcingError(f"{teacher_dir} has no chat template: a chat corpus needs an "
                                "instruct teacher (import one with `kforcing import`)")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(teacher_dir / TOKENIZER_FILE)
        text = render_chat(cfg, [{"role": "user", "content": _MARK}], add_generation_prompt=False)
        self.user_prefix = self.encode(text[:text.index(_MARK)])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prompt(self, question: str) -> list[int]:
        return self.encode(render_chat(self.cfg, [{"role": "user", "content": question}]))


def _chunk(teacher: Transformer, tmpl: ChatTemplate, c: int, *, questions: list[str] | None,
           batch_size: int, question_tokens: int, answer_tokens: int, seed: int,
           temperature: float) -> list[dict]:
    sampling = SamplingConfig(temperature=temperature)
    if questions is None:
        res = generate_ar(teacher, [tmpl.user_prefix] * batch_size, question_tokens,
                          sampling=sampling, seed=(seed * 1_000_003 + 2 * c) * 1024)
        questions = [tmpl.decode(q).strip() for q, done in zip(res.tokens, res.finished,
                                                                  strict=True)
                     if done and len(q) >= 4]
    convs = []
    if questions:
        prompts = [tmpl.prompt(q) for q in questions]
        res = generate_ar(teacher, prompts, answer_tokens, sampling=sampling,
                          seed=(seed * 1_000_003 + 2 * c + 1) * 1024)
        for q, p, a, done in zip(questions, prompts, res.tokens, res.finished, strict=True):
            convs.append({"question": q, "answer": tmpl.decode(a), "finished": bool(done),
                          "tokens": p + a})
    return convs


@torch.no_grad()
def chat_corpus(teacher: Transformer, teacher_dir: str | Path, root: str | Path, *,
                conversations: int, prompts: Sequence[str] | None = None, batch_size: int = 32,
                question_tokens: int = 64, answer_tokens: int = 256, val_fraction: float = 0.05,
                seed: int = 0, temperature: float = 1.0, chunks: Iterable[int] | None = None,
                progress: bool = True) -> Path:
    """Sample about `conversations` chats from the teacher (fewer when questions are dropped);
    returns the corpus directory, reused when complete. With `prompts`, their questions are
    used in order (cycled) instead of the teacher's own. `chunks` limits this process to some
    chunk indices (the corpus is assembled by whichever process finds all chunks present)."""
    teacher_dir = resolve_model_dir(teacher_dir)
    if conversations < 1 or batch_size < 1:
        raise KForcingError("conversations and batch_size must be positive")
    tmpl = ChatTemplate(teacher_dir)
    settings = {"teacher": str(teacher_dir.resolve()), "seed": seed, "batch_size": batch_size,
                "temperature": temperature, "question_tokens": question_tokens,
                "answer_tokens": answer_tokens,
                "prompts": None if prompts is None else hashlib.sha256(
                    "\n".join(prompts).encode()).hexdigest()[:16],
                "teacher_config": hashlib.sha256((teacher_dir / CONFIG_FILE).read_bytes())
                .hexdigest()[:16]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(root) / key
    n_chunks = -(-conversations // batch_size)
    marker = out / "corpus.json"
    if marker.is_file() and load_json(marker).get("chunks") == n_chunks:
        return out
    todo = [c for c in (range(n_chunks) if chunks is None else chunks) if 0 <= c < n_chunks]
    was_training = teacher.training
    teacher.eval()
    bar = tqdm(todo, desc="teacher chats", unit="chunk", disable=not progress,
               dynamic_ncols=True)
    for c in bar:
        path = out / "chunks" / f"chunk-{c:05d}.json"
        if path.is_file():
            continue
        qs = None
        if prompts is not None:
            qs = [prompts[(c * batch_size + i) % len(prompts)] for i in range(batch_size)]
        convs = _chunk(teacher, tmpl, c, questions=qs, batch_size=batch_size,
                       question_tokens=question_tokens, answer_tokens=answer_tokens,
                       seed=seed, temperature=temperature)
        atomic_write_bytes(path, json.dumps(convs).encode())
    teacher.train(was_training)
    paths = [out / "chunks" / f"chunk-{c:05d}.json" for c in range(n_chunks)]
    if not all(p.is_file() for p in paths):
        return out                        # another process finishes the rest
    convs = [conv for p in paths for conv in json.loads(p.read_text())]
    if len(convs) < 2:
        raise KForcingError(f"the teacher wrote only {len(convs)} usable conversations: raise "
                            "conversations or question_tokens")
    n_val = max(1, round(val_fraction * len(convs)))
    vocab = teacher.config.vocab_size
    stats = {}
    for name, part in (("validation", convs[:n_val]), ("train", convs[n_val:])):
        docs = [np.asarray(conv["tokens"]) for conv in part]
        write_token_file(out / f"{name}.bin", docs, vocab_size=vocab, num_documents=len(docs))
        stats[name] = int(sum(d.size for d in docs))
    atomic_write_bytes(out / TOKENIZER_FILE, (teacher_dir / TOKENIZER_FILE).read_bytes())
    atomic_write_bytes(out / "conversations.jsonl", "".join(
        json.dumps({k: v for k, v in conv.items() if k != "tokens"}) + "\n"
        for conv in convs).encode())
    atomic_write_json(marker, {"source": "teacher chats", "settings": settings,
                               "chunks": n_chunks, "conversations": len(convs),
                               "validation_conversations": n_val, "tokens": stats})
    return out
