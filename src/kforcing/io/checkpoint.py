"""Checkpoints: safetensors for tensors, JSON for everything else, every file written atomically.

A model directory holds `config.json` ({"model": ModelConfig, ...}), `model.safetensors` and,
when known, `tokenizer.json`. A training run directory holds `checkpoints/step-XXXXXXX/` (each a
model directory plus the trainer state) and `checkpoints/latest.json` naming the newest one;
`load_model` accepts either kind of directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kforcing.core.config import ModelConfig, from_dict, load_json
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"


def _umask_mode() -> int:
    """0o666 under the process umask: what open() would give (mkstemp makes 0o600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; move it into place (with the mode open() would give)
    only if the block succeeds, so readers see the old file or the complete new one, never half
    a file. The one atomic writer: every file the package writes goes through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise KForcingError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise KForcingError(f"corrupt weights file {path}: {e}") from None


def _tied_outputs(module: torch.nn.Module) -> list[tuple[str, str]]:
    """(output key, embedding key) of every Transformer in module that ties its embeddings."""
    pairs = []
    for name, sub in module.named_modules():
        if isinstance(sub, Transformer) and sub.config.tie_embeddings:
            prefix = f"{name}." if name else ""
            pairs.append((f"{prefix}output.weight", f"{prefix}tok_embeddings.weight"))
    return pairs


def model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a model (or a module holding models, e.g. a student) without the tied
    output weights (safetensors refuses shared storage); `load_state` re-ties them."""
    state = module.state_dict()
    for out_key, _ in _tied_outputs(module):
        state.pop(out_key, None)
    return state


def save_model(model: Transformer, out_dir: str | Path, *, tokenizer: str | Path | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write config.json, model.safetensors (and copy tokenizer.json) into out_dir."""
    out_dir = Path(out_dir)
    atomic_save_tensors(out_dir / MODEL_FILE, model_state(model), metadata={"format": "pt"})
    atomic_write_json(out_dir / CONFIG_FILE, {"model": asdict(model.config), **(extra or {})})
    if tokenizer is not None and Path(tokenizer).resolve() != (out_dir / TOKENIZER_FILE).resolve():
        atomic_write_bytes(out_dir / TOKENIZER_FILE, Path(tokenizer).read_bytes())
    return out_dir


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory whose checkpoints/latest.json names one."""
    path = Path(path)
    if not path.exists():
        raise KForcingError(f"checkpoint not found: {path}")
    if path.is_file():
        path = path.parent
    if (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    latest = path / "checkpoints" / "latest.json"
    if latest.is_file():
        name = load_json(latest)
        if not isinstance(name, dict) or not isinstance(name.get("name"), str):
            raise KForcingError(f"corrupt {latest}: expected {{\"name\": \"step-...\"}}")
        return path / "checkpoints" / name["name"]
    raise KForcingError(f"no checkpoint in {path}: expected {CONFIG_FILE} + {MODEL_FILE} "
                        "or checkpoints/latest.json")


def load_model_config(path: str | Path) -> ModelConfig:
    cfg = load_json(resolve_model_dir(path) / CONFIG_FILE)
    if "model" not in cfg:
        raise KForcingError(f"{path}/{CONFIG_FILE} has no 'model' section")
    return from_dict(ModelConfig, cfg["model"])


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    """Rebuild a model from its directory alone; errors name the missing or broken file."""
    mdir = resolve_model_dir(path)
    cfg = load_model_config(mdir)
    model = Transformer(cfg)
    state = load_tensors(mdir / MODEL_FILE)
    load_state(model, state, mdir / MODEL_FILE)
    return model.to(device=device, dtype=dtype).eval()


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str
               ) -> None:
    """Load weights saved by `model_state` into a model or a module holding models (tied
    outputs restored), naming what does not fit: the one weight loader."""
    state = dict(state)
    for out_key, emb_key in _tied_outputs(module):
        if emb_key in state:
            state[out_key] = state[emb_key]
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:   # shape mismatches
        first = str(e).splitlines()[1:2] or [str(e)]
        raise KForcingError(f"{source} does not match its config: {first[0].strip()}") from None
    if missing or unexpected:
        raise KForcingError(f"{source} does not match its config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")


def tokenizer_path(path: str | Path) -> Path:
    p = resolve_model_dir(path) / TOKENIZER_FILE
    if not p.is_file():
        # a run directory keeps the tokenizer at its top level
        top = Path(path) / TOKENIZER_FILE
        if top.is_file():
            return top
        raise KForcingError(f"no {TOKENIZER_FILE} next to the model in {path}")
    return p
