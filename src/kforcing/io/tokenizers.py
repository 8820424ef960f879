"""Tokenizers: train a byte-level BPE (lossless on any text), save and load tokenizer.json, and
the EOS token that separates documents in every token stream."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kforcing.errors import KForcingError
from kforcing.io.checkpoint import atomic_path

EOS_TOKEN = "<|endoftext|>"


class HasText(Protocol):
    """A document (kforcing.io.corpora.Document, or anything with a .text)."""

    text: str


def _tokenizer_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / "tokenizer.json" if path.is_dir() or path.suffix != ".json" else path


def train_tokenizer(
    docs: Sequence[HasText], vocab_size: int = 8192, *, path: Path | None = None
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (lossless on any text); optionally save tokenizer.json."""
    if vocab_size < 257:
        raise KForcingError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: the decoded text must equal the input byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 bytes up front, so text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    if path is not None:
        save_tokenizer(tokenizer, path)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write tokenizer.json atomically (path: the file itself or its folder)."""
    file = _tokenizer_file(path)
    with atomic_path(file) as tmp:
        tokenizer.save(str(tmp))
    return file


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json (the file itself or a folder holding it)."""
    file = _tokenizer_file(path)
    if not file.is_file():
        raise KForcingError(f"tokenizer not found: {file}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KForcingError(f"could not read tokenizer {file}: {first}") from None


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of EOS_TOKEN, which separates documents in every token stream."""
    i = tokenizer.token_to_id(EOS_TOKEN)
    if i is None:
        raise KForcingError(f"the tokenizer has no {EOS_TOKEN} token; train one with kforcing")
    return i
