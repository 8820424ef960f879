"""Token streams: flat token files on disk and the batches training reads from them.

    write_token_file(path, chunks)  -> path + path.json   uint16/uint32 stream + sidecar
    encode_documents(docs, tok, p)  -> the same, from documents (EOS after each)
    TokenFile(p) / BlockLoader(..)  -> (x, y) tensors     memory-mapped, deterministic, resumable
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from kforcing.errors import KForcingError
from kforcing.io.checkpoint import atomic_path, atomic_write_json
from kforcing.io.tokenizers import HasText, eos_id


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype a token stream of this vocabulary fits in."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def write_token_file(path: str | Path, chunks: Iterable[np.ndarray], *, vocab_size: int,
                     num_documents: int) -> int:
    """The one token-file writer: `chunks` (1-D token arrays) as one flat stream to `path`,
    then its .json sidecar (dtype, num_tokens, num_documents, vocab_size), each atomically;
    returns the token count. Chunks are written as they come, so a corpus never has to fit in
    memory."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    num_tokens = 0
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        for chunk in chunks:
            f.write(np.asarray(chunk, dtype=dtype).tobytes())
            num_tokens += len(chunk)
    atomic_write_json(path.with_suffix(".json"), {
        "dtype": dtype.name, "num_tokens": num_tokens, "num_documents": num_documents,
        "vocab_size": vocab_size})
    return num_tokens


def encode_documents(
    docs: Sequence[HasText],
    tokenizer: Tokenizer,
    path: Path,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write docs as one flat token stream (EOS after each) to `path`, plus a .json sidecar."""
    eos = eos_id(tokenizer)
    bar = tqdm(total=len(docs), unit="doc", desc=Path(path).name, disable=not progress)

    def chunks() -> Iterator[list[int]]:
        # Chunk by chunk: only batch_size documents are ever held in memory as tokens.
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            # No special tokens: a stream is exactly the documents' tokens, each followed by EOS.
            encodings = tokenizer.encode_batch([d.text for d in chunk], add_special_tokens=False)
            yield [t for enc in encodings for t in (*enc.ids, eos)]
            bar.update(len(chunk))

    write_token_file(path, chunks(), vocab_size=tokenizer.get_vocab_size(),
                     num_documents=len(docs))
    bar.close()
    return Path(path)


class TokenFile:
    """A read-only, memory-mapped token stream written by encode_documents."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.is_file():
            raise KForcingError(f"token file not found: {self.path}")
        if not meta_path.is_file():
            raise KForcingError(f"missing sidecar {meta_path} for {self.path}; re-run prepare")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"])
            num_tokens = int(meta["num_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise KForcingError(f"corrupt sidecar {meta_path}: {e}") from None
        if dtype not in (np.uint16, np.uint32):
            raise KForcingError(f"{meta_path}: unsupported dtype {dtype.name}")
        size, expected = self.path.stat().st_size, num_tokens * dtype.itemsize
        if size != expected:
            raise KForcingError(
                f"{self.path} has {size} bytes but {meta_path.name} says {num_tokens} tokens "
                f"({expected} bytes); the file is truncated or stale, re-run prepare"
            )
        self.meta = meta
        self.vocab_size = meta.get("vocab_size")
        self.num_documents = meta.get("num_documents")
        # np.memmap cannot map an empty file; an empty split is still a valid (empty) stream.
        if num_tokens:
            self.tokens = np.memmap(self.path, dtype=dtype, mode="r", shape=(num_tokens,))
        else:
            self.tokens = np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def num_blocks(self, block_size: int) -> int:
        """Blocks of block_size + 1 tokens (inputs + shifted targets) taken every block_size."""
        if block_size < 1:
            raise KForcingError(f"block_size must be positive, got {block_size}")
        return max(0, (len(self) - 1) // block_size)

    def block(self, i: int, block_size: int) -> np.ndarray:
        if not 0 <= i < self.num_blocks(block_size):
            raise IndexError(f"block {i} out of range ({self.num_blocks(block_size)} blocks)")
        start = i * block_size
        return self.tokens[start : start + block_size + 1].astype(np.int64)


class BlockLoader:
    """Deterministic, resumable (x, y) batches of token blocks.

    Epoch e visits every block once, in the order torch.randperm gives for seed + e, so the
    whole sequence of batches is a pure function of (seed, epoch, position): saving those two
    integers is enough to resume exactly. A batch that runs past the end of an epoch is
    completed from the start of the next one.

    In a multi-process run every rank walks the same global sequence of batches and `shard`
    (training.distributed.shard) keeps its own disjoint slice of each, so the state to resume
    is the same on every rank.
    """

    def __init__(
        self,
        token_file: TokenFile,
        *,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shard: Callable[[list[int]], list[int]] | None = None,
    ):
        if batch_size < 1:
            raise KForcingError(f"batch_size must be positive, got {batch_size}")
        self.token_file = token_file
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shard = shard
        self.num_blocks = token_file.num_blocks(block_size)
        if self.num_blocks == 0:
            raise KForcingError(
                f"{token_file.path} has {len(token_file)} tokens, fewer than one block of "
                f"{block_size + 1}; use a smaller block size or more data"
            )
        self.epoch = 0
        self.position = 0  # blocks of the current epoch already served
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:  # recomputed once per epoch, not per batch
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.num_blocks, generator=g)
            else:
                self._order = torch.arange(self.num_blocks)
            self._order_epoch = self.epoch
        return self._order

    def _collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = np.stack([self.token_file.block(i, self.block_size) for i in indices])
        b = torch.from_numpy(blocks)
        return b[:, :-1].contiguous(), b[:, 1:].contiguous()

    def next_indices(self) -> list[int]:
        """The block indices of the next global batch (every rank's shards together)."""
        indices: list[int] = []
        while len(indices) < self.batch_size:
            take = min(self.batch_size - len(indices), self.num_blocks - self.position)
            indices += self._epoch_order()[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.num_blocks:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of this rank's shard of the next global batch: (B / world, block_size) each."""
        indices = self.next_indices()
        return self._collate(self.shard(indices) if self.shard else indices)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise KForcingError(f"bad data loader state {state!r}") from None
        if epoch < 0 or not 0 <= position < self.num_blocks:
            raise KForcingError(
                f"data loader state (epoch {epoch}, position {position}) does not fit this data "
                f"({self.num_blocks} blocks); was the corpus re-prepared?"
            )
        self.epoch, self.position = epoch, position

    def iter_eval(
        self, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every block in file order (last batch may be smaller); training state is untouched."""
        for n, start in enumerate(range(0, self.num_blocks, self.batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            yield self._collate(list(range(start, min(start + self.batch_size, self.num_blocks))))
