"""Typed configuration. Every checkpoint stores its config as JSON so it can rebuild itself."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kforcing.errors import KForcingError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise KForcingError(msg)


def check_types(cfg: Any) -> None:
    """Reject wrongly typed values (e.g. "64" from a hand-edited config.json) by field name."""
    simple = {"int": int, "float": (int, float), "bool": bool, "str": str}
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if val is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds if k in simple for t in
                        (simple[k] if isinstance(simple[k], tuple) else (simple[k],)))
        if not allowed:
            continue
        if not isinstance(val, allowed) or (isinstance(val, bool) and bool not in allowed):
            raise KForcingError(f"{type(cfg).__name__}: {f.name} must be {' or '.join(kinds)}, "
                                f"got {val!r}")


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: int = 4
    dim: int = 256
    intermediate_size: int = 688
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    eos_id: int | None = None
    attention_bias: bool = False   # bias on the q/k/v projections (Qwen2-style)
    # Llama 3.1-style frequency-dependent RoPE scaling: {"factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None = plain RoPE
    rope_scaling: dict[str, float] | None = None

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "dim",
                     "intermediate_size", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model config: {name} must be positive")
        _check(self.dim % self.n_head == 0,
               f"model config: dim {self.dim} is not divisible by n_head {self.n_head}")
        _check(self.n_head % self.n_kv_head == 0,
               f"model config: n_head {self.n_head} is not a multiple of "
               f"n_kv_head {self.n_kv_head}")
        _check(self.head_dim % 2 == 0, "model config: head_dim must be even for RoPE")
        _check(0.0 <= self.dropout < 1.0, "model config: dropout must be in [0, 1)")
        if self.rope_scaling is not None:
            keys = {"factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"}
            _check(isinstance(self.rope_scaling, dict) and set(self.rope_scaling) == keys,
                   f"model config: rope_scaling needs exactly {', '.join(sorted(keys))}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def num_params(self) -> int:
        """Parameter count computed from the shapes (embeddings counted once when tied)."""
        d, f, hd = self.dim, self.intermediate_size, self.head_dim
        attn = d * (self.n_head * hd) + 2 * d * (self.n_kv_head * hd) + (self.n_head * hd) * d
        if self.attention_bias:
            attn += (self.n_head + 2 * self.n_kv_head) * hd
        block = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * block + emb + d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise KForcingError(
                f"unknown model preset '{name}': choose one of {', '.join(MODEL_PRESETS)}")
        return from_dict(cls, {**asdict(MODEL_PRESETS[name]), **overrides})


MODEL_PRESETS: dict[str, ModelConfig] = {
    # seconds on a CPU: unit tests
    "tiny": ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, dim=64,
                        intermediate_size=172, max_seq_len=256),
    # ~6.4M parameters with an 8192 vocabulary: trains on a 2-core CPU in under an hour
    "small": ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_kv_head=4, dim=256,
                         intermediate_size=688, max_seq_len=512, dropout=0.1),
    # ~110M parameters, the paper's 12 layers x 768 scale: for GPUs
    "base": ModelConfig(vocab_size=32768, n_layer=12, n_head=12, n_kv_head=4, dim=768,
                        intermediate_size=2048, max_seq_len=1024),
}


@dataclass
class TrainConfig:
    """Teacher pretraining. Defaults are the `small` CPU recipe."""

    data: str = ""                 # prepared corpus directory (kforcing data prepare)
    out_dir: str = "runs/teacher"
    model: str = "small"           # preset name
    model_overrides: dict[str, Any] = field(default_factory=dict)
    block_size: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 2000
    time_budget_min: float | None = None   # stop (with a checkpoint) after this many minutes
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    bf16: bool = False
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        # what a user most likely got wrong comes first: the preset, then the schedule
        _check(self.model in MODEL_PRESETS, f"unknown model preset '{self.model}': choose one "
               f"of {', '.join(MODEL_PRESETS)}")
        _check(self.block_size > 1, "train config: block_size must be > 1")
        _check(self.batch_size > 0 and self.grad_accum > 0,
               "train config: batch_size and grad_accum must be positive")
        _check(self.max_steps > 0, "train config: max_steps must be positive")
        _check(math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr <= self.lr,
               "train config: need 0 <= min_lr <= lr, lr a finite number")
        _check(self.time_budget_min is None or 0 < self.time_budget_min < math.inf,
               f"train config: time_budget_min must be a finite number > 0, got "
               f"{self.time_budget_min}")
        # a warmup longer than the run is shortened (training/teacher.py: warmup_steps), so
        # `--max-steps 3` is a valid smoke run
        _check(self.warmup_steps >= 0, "train config: warmup_steps must be >= 0")
        _check(self.eval_every > 0 and self.ckpt_every > 0,
               "train config: eval_every and ckpt_every must be positive")


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a dataclass from a dict, naming unknown keys instead of failing inside __init__."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KForcingError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    return cls(**data)


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise KForcingError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KForcingError(f"corrupt JSON in {path}: {e}") from None
