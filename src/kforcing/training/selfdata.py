"""Data-free distillation: a corpus made of the teacher's own samples.

A student only has to reproduce its teacher, so the teacher's samples are valid training
contexts when no corpus in its tokenizer is at hand. They are generated in chunks (each written
atomically, so an interrupted run keeps what it made) and cached; the result is a directory that
reads like a prepared corpus (train.bin / validation.bin + sidecars, tokenizer.json).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kforcing.core.config import load_json
from kforcing.core.model import Transformer
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    atomic_write_bytes,
    atomic_write_json,
    resolve_model_dir,
)
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import token_dtype, write_token_file


def start_token(teacher_dir: Path, teacher: Transformer) -> int:
    """The token every sample starts from: the tokenizer's BOS when it has one, else EOS, else 0."""
    tok_cfg = teacher_dir / "tokenizer_config.json"
    tok_file = teacher_dir / TOKENIZER_FILE
    if tok_cfg.is_file() and tok_file.is_file():
        bos = load_json(tok_cfg).get("bos_token")
        if isinstance(bos, str):
            i = load_tokenizer(tok_file).token_to_id(bos)
            if i is not None:
                return i
    return teacher.config.eos_id if teacher.config.eos_id is not None else 0


@torch.no_grad()
def teacher_corpus(teacher: Transformer, teacher_dir: str | Path, root: str | Path, *,
                   n_tokens: int, seq_len: int = 256, batch_size: int = 16, seed: int = 0,
                   temperature: float = 1.0, progress: bool = True) -> Path:
    """Sample n_tokens (+ n_tokens / 16 held out) from the teacher at `temperature`, seq_len
    tokens per sample; returns the corpus directory (reused when it already exists)."""
    teacher_dir = resolve_model_dir(teacher_dir)
    seq_len = min(seq_len, teacher.config.max_seq_len)
    n_val = max(n_tokens // 16, 16 * seq_len)
    start = start_token(teacher_dir, teacher)
    settings = {"teacher": str(teacher_dir.resolve()), "seq_len": seq_len, "seed": seed,
                "temperature": temperature, "start_token": start,
                "teacher_config": hashlib.sha256((teacher_dir / CONFIG_FILE).read_bytes())
                .hexdigest()[:16]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(root) / key
    marker = out / "corpus.json"
    if marker.is_file() and load_json(marker).get("tokens", {}).get("train", 0) >= n_tokens:
        return out
    vocab = teacher.config.vocab_size
    dtype = token_dtype(vocab)
    chunk_tokens = batch_size * seq_len
    n_chunks = -(-(n_tokens + n_val) // chunk_tokens)
    bar = tqdm(total=n_chunks * chunk_tokens, unit="tok", desc="teacher samples",
               disable=not progress, dynamic_ncols=True)
    chunks = []
    was_training = teacher.training
    teacher.eval()
    for c in range(n_chunks):
        path = out / "chunks" / f"chunk-{c:05d}.bin"
        if not path.is_file():
            res = generate_ar(teacher, [[start]] * batch_size, seq_len - 1,
                              sampling=SamplingConfig(temperature=temperature),
                              seed=seed * 100_003 + c, stop_at_eos=False)
            rows = np.asarray([[start] + r for r in res.tokens], dtype=dtype)
            atomic_write_bytes(path, rows.tobytes())
        chunks.append(np.fromfile(path, dtype=dtype))
        bar.update(chunk_tokens)
    bar.close()
    teacher.train(was_training)
    stream = np.concatenate(chunks)
    splits = {"validation": stream[:n_val], "train": stream[n_val:]}
    for name, toks in splits.items():
        write_token_file(out / f"{name}.bin", [toks], vocab_size=vocab,
                         num_documents=int(toks.size // seq_len))
    if (teacher_dir / TOKENIZER_FILE).is_file():
        atomic_write_bytes(out / TOKENIZER_FILE, (teacher_dir / TOKENIZER_FILE).read_bytes())
    atomic_write_json(marker, {"source": "teacher samples", "settings": settings,
                               "tokens": {k: int(v.size) for k, v in splits.items()}})
    return out
