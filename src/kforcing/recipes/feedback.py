"""One stage of the token-feedback student (docs/METHOD.md section 9), as `kforcing distill
--design feedback` and `kforcing reproduce` run it: the teacher cache first when the stage needs
one (stage k=1; built when missing, finished when a build was interrupted), then the trainer.

The cache does not depend on the draft, so by default the stages of one chain share it: it
lives next to the stage's output directory, in <out>/../teacher-cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, resolve_model_dir
from kforcing.io.tokens import TokenFile
from kforcing.recipes.commands import config_command
from kforcing.training.feedback import FeedbackTrainConfig, FeedbackTrainer
from kforcing.training.feedback_cache import CacheSpec, build_teacher_cache

CACHE_NAME = "teacher-cache"


@dataclass
class CacheOptions:
    """How the teacher cache of stage k=1 is built (the CacheSpec fields a user chooses)."""

    windows: int = CacheSpec.windows
    block_size: int = CacheSpec.block_size
    top_n: int = CacheSpec.top_n
    bf16: bool = CacheSpec.bf16


def default_cache_dir(out_dir: str | Path) -> Path:
    """Where a stage's teacher cache goes unless named: beside the stage, shared by the chain."""
    return Path(out_dir).parent / CACHE_NAME


def cache_spec(teacher: str, data: str, opts: CacheOptions, seed: int = 0) -> CacheSpec:
    """The cache spec of a teacher on a prepared corpus's train split (paths resolved, so the
    same cache is recognised from any working directory). opts.windows is an upper bound: a
    smaller corpus gives all its windows."""
    tokens = Path(data) / "train.bin"
    if not tokens.is_file():
        raise KForcingError(f"no prepared corpus in '{data}' (train.bin missing)")
    blocks = TokenFile(tokens).num_blocks(opts.block_size)
    if blocks < 1:
        raise KForcingError(f"{tokens} is shorter than one cache window of {opts.block_size} "
                            "tokens")
    return CacheSpec(teacher=str(resolve_model_dir(teacher).resolve()),
                     tokens=str(tokens.resolve()), block_size=opts.block_size,
                     top_n=opts.top_n, windows=min(opts.windows, blocks), seed=seed,
                     bf16=opts.bf16)


def ensure_cache(cfg: FeedbackTrainConfig, opts: CacheOptions, *, progress: bool = True) -> Path:
    """The stage's teacher cache, built or finished when incomplete (a complete one with the
    same spec is reused as it is)."""
    if not cfg.cache:
        raise KForcingError("no teacher cache directory given")
    spec = cache_spec(cfg.teacher, cfg.data, opts, cfg.seed)
    teacher = load_model(spec.teacher, device=cfg.device)
    if spec.block_size > teacher.config.max_seq_len:
        raise KForcingError(f"cache block size {spec.block_size} exceeds the teacher's context "
                            f"of {teacher.config.max_seq_len} tokens")
    return build_teacher_cache(teacher, spec, cfg.cache, progress=progress)


def run_feedback_stage(cfg: FeedbackTrainConfig, opts: CacheOptions | None = None, *,
                       resume: bool = False, progress: bool = True,
                       cache_only: bool = False) -> dict:
    """Train one stage (the cache first at k=1, or only the cache with cache_only); returns
    {"config", "cache", "final"} ("final": the trainer's last record, None with cache_only)."""
    opts = opts or CacheOptions()
    if cfg.threads:            # the cache's teacher passes too
        torch.set_num_threads(cfg.threads)
    cache = None
    if cfg.k == 1 or cache_only:
        cache = str(ensure_cache(cfg, opts, progress=progress))
    final = None
    if not cache_only:
        final = FeedbackTrainer(cfg, resume=resume, progress=progress).fit()
    return {"config": asdict(cfg), "cache": cache, "final": final}


def stage_command(cfg: FeedbackTrainConfig, opts: CacheOptions | None = None, *,
                  cache_only: bool = False) -> str:
    """The `kforcing distill --design feedback` command that runs this stage (with the cache
    flags that differ from their defaults where the stage builds the cache)."""
    extra: dict = {"design": "feedback"}
    if opts is not None and (cfg.k == 1 or cache_only):
        default = CacheOptions()
        extra.update({f"cache_{name}": value for name, value in asdict(opts).items()
                      if value != getattr(default, name)})
    return config_command("distill", cfg, **extra, cache_only=cache_only)
