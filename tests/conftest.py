"""Shared fixtures: a seeded tiny-model factory and a tiny prepared corpus (built once per session).

Everything here is deliberately small (2 layers, width 64) so the whole suite runs in seconds on a
busy 2-core CPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.decoding import autok
from kforcing.decoding.machine import Usage
from kforcing.io.corpora import PreparedCorpus, prepare_corpus
from kforcing.io.tokenizers import eos_id, load_tokenizer

# The tests are tiny; one thread avoids fighting over the cores with anything else running, and
# keeps every floating-point reduction in a fixed order.
torch.set_num_threads(1)

_WORD_TEXT = (
    "the a of and to in is was he she it they we you that this with for on at by from "
    "river stone garden window morning evening quiet bright small large old new green "
    "walked talked opened closed found lost carried painted remembered wondered "
    "letter book table chair door road city village sea mountain cloud rain sun"
)
WORDS = _WORD_TEXT.split()


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    """make_model(seed=0, **overrides) -> a `tiny` Transformer in eval mode, fp32, CPU."""

    def factory(seed: int = 0, **overrides) -> Transformer:
        cfg = ModelConfig.preset("tiny", **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Transformer(cfg)
        return model.eval()

    return factory


def _write_texts(folder: Path, n_files: int = 12, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        sentences = []
        for _ in range(25):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> PreparedCorpus:
    """A prepared corpus (train/validation/test .bin + tokenizer.json) with a ~300-token vocab."""
    root = tmp_path_factory.mktemp("corpus")
    _write_texts(root / "texts")
    prep = prepare_corpus(str(root / "texts"), root / "prepared", vocab_size=300, progress=False)
    for split in ("train", "validation", "test"):
        assert (prep.dir / f"{split}.bin").is_file()
    return prep


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus):
    return load_tokenizer(tiny_corpus.tokenizer_path)


@pytest.fixture(scope="session")
def saved_tiny_model(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """A saved `tiny` model directory (max_seq_len 32) with the corpus tokenizer next to it."""
    from kforcing.io.checkpoint import save_model

    cfg = ModelConfig.preset(
        "tiny",
        vocab_size=tiny_tokenizer.get_vocab_size(),
        max_seq_len=32,
        eos_id=eos_id(tiny_tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model, out, tokenizer=tiny_corpus.tokenizer_path)
    return out


def fake_watch(load: float, cpu_share: float):
    """A stand-in for decoding.machine.Watch whose timed run saw this load average (before
    and after) and got this many CPU seconds per wall second."""
    class Fake:
        def __init__(self, threads):
            self.threads = threads

        def stop(self):
            return Usage(load, load, cpu_share, 1.0, self.threads)
    return Fake


@pytest.fixture
def quiet_autok(monkeypatch):
    """--k auto calibrations record a quiet machine whatever the real load: a calibration timed
    on a busy machine is not reused (decoding/autok.py), and the caching tests must not depend
    on what else runs beside the suite."""
    monkeypatch.setattr(autok, "Watch", fake_watch(0.0, 1.0))
