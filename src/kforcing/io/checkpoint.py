"""Checkpoints: safetensors for tensors, JSON for everything else, every file written atomically.

A model directory holds `config.json` ({"model": ModelConfig, ...}), `model.safetensors` and,
when known, `tokenizer.json`. A training run directory holds `checkpoints/step-XXXXXXX/` (each a
model directory plus the trainer state) and `checkpoints/latest.json` naming the newest one;
`load_model` accepts either kind of directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kforcing.core.config import ModelConfig, from_dict, load_json
from kforcing.errors import KForcingError
from kforcing.core.model import Transformer

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"


def _umask_mode() -> int:
    """0o666 under the process umask: what open() would give (mkstemp makes 0o600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise KForcingError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise KForcingError(f"corrupt weights file {path}: {e}") from None


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict without the tied output weight (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
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


def load_state(model: Transformer, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load weights saved by save_model (tied output restored), naming what does not fit."""
    if model.config.tie_embeddings and "tok_embeddings.weight" in state:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
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


def publish_checkpoint(run_dir: Path, step: int, write: Any, keep: int = 2) -> Path:
    """Write a checkpoint into a temp directory via write(tmp_dir), rename it into place, then
    point checkpoints/latest.json at it. A crash at any moment leaves the previous one intact."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}."))
    try:
        write(tmp)
        final = ckpt_root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(ckpt_root / "latest.json", {"name": name, "step": step})
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


class MetricsLog:
    """Append-only JSONL metrics of a run; `rewind(step)` drops what a resumed run will redo,
    so the log of an interrupted and resumed run reads like one uninterrupted run."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        if not self.path.exists():
            return
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        keep = [r for r in records if r.get("step", 0) <= step and not r.get("final")]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
