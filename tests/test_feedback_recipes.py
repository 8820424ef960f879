"""The GPU recipes of the token-feedback student (configs/smollm2_feedback_*.json,
docs/DISTRIBUTED.md): every config the docs name parses, and each one builds its models and
trains two steps of stage k=1 (from a teacher cache) and of a self-forcing stage k=2 (--init)
on the CPU, with a random teacher of SmolLM2's architecture and tiny batches."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kforcing.cli.distill import feedback_config
from kforcing.cli.main import build_parser
from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import save_model
from kforcing.io.tokens import write_token_file
from kforcing.training.feedback import FeedbackTrainConfig, FeedbackTrainer
from kforcing.training.feedback_cache import CacheSpec, build_teacher_cache

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
# SmolLM2-135M (tests/test_distributed.py ARCHITECTURES) with 2 of its 30 blocks: the width,
# heads, vocabulary and draft vocabulary are the real ones, the depth only costs time here
SMOLLM2 = dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, dim=576,
               intermediate_size=1536, max_seq_len=1024, rope_theta=100000.0)
BLOCKS = 2
RECIPES = sorted(p.name for p in CONFIGS.glob("smollm2_feedback*.json"))


def named_configs() -> list[str]:
    docs = (ROOT / "docs" / "DISTRIBUTED.md").read_text()
    return sorted(set(re.findall(r"configs/(smollm2_feedback\w*\.json)", docs)))


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def test_every_feedback_config_is_in_the_docs_and_parses():
    assert named_configs() == RECIPES == ["smollm2_feedback_8gpu.json",
                                          "smollm2_feedback_gpu.json"]
    for name in RECIPES:
        cfg = FeedbackTrainConfig(**load(name))
        assert (cfg.k, cfg.device, cfg.student.draft_vocab_size) == (1, "cuda", 8192)


def test_distill_passes_the_device_to_the_feedback_config():
    argv = ["distill", "--design", "feedback", "--config", str(CONFIGS / RECIPES[0]), "--k", "2"]
    parse = build_parser().parse_args
    assert feedback_config(parse(argv)).device == "cuda"          # the config's
    assert feedback_config(parse([*argv, "--device", "cpu"])).device == "cpu"


@pytest.mark.parametrize("device", ["meta", "gpu", "cuda:x"])
def test_a_bad_device_is_refused_by_name(device, tmp_path):
    cfg = FeedbackTrainConfig(teacher=str(tmp_path / "none"), data=str(tmp_path), k=2,
                              device=device)
    with pytest.raises(KForcingError, match=f"unknown device '{device}'"):
        FeedbackTrainer(cfg, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    cfg = FeedbackTrainConfig(teacher=str(tmp_path / "none"), data=str(tmp_path), k=2,
                              device="cuda")
    with pytest.raises(KForcingError, match="device 'cuda' is not available"):
        FeedbackTrainer(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_feedback_recipe_dry_run(name, tmp_path):
    arch = ModelConfig(**{**SMOLLM2, "n_layer": BLOCKS})
    torch.manual_seed(0)
    teacher = Transformer(arch)
    save_model(teacher, tmp_path / "teacher")
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        write_token_file(tmp_path / "data" / f"{split}.bin",
                         [rng.integers(0, arch.vocab_size, 2000)], vocab_size=arch.vocab_size,
                         num_documents=1)
    spec = CacheSpec(teacher=str(tmp_path / "teacher"), tokens=str(tmp_path / "data/train.bin"),
                     block_size=16, top_n=128, windows=4, shard_windows=4, bf16=True)
    build_teacher_cache(teacher, spec, tmp_path / "cache", progress=False)
    base = FeedbackTrainConfig(**load(name))
    for k in (1, 2):       # stage k=1 from the cache, then a self-forcing stage from it
        cfg = replace(base, teacher=str(tmp_path / "teacher"), data=str(tmp_path / "data"),
                      out_dir=str(tmp_path / f"k{k}"), k=k, cache=str(tmp_path / "cache"),
                      init=str(tmp_path / "k1") if k == 2 else None, device="cpu",
                      batch_size=2, context=16, anchors=4, max_steps=2, time_budget_min=None,
                      eval_every_min=1000.0, eval_windows=2, eval_context=16, ckpt_every=1000)
        rec = FeedbackTrainer(cfg, progress=False).fit()
        assert rec["step"] == 2 and rec["k"] == k
