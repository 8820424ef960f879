"""Shareable checkpoints: one self-contained directory per model or K-Forcing student.

    kforcing.save(obj, "out/")   obj: a Transformer, a PushForward student, or the path of a
                                 model directory / distillation run / student checkpoint
    kforcing.load("out/")        -> Transformer or PushForward, ready for generate()

Layout (the Hugging Face Hub conventions, so `huggingface_hub.upload_folder` publishes it as is):

    config.json           {"format": "kforcing", "kind": "model"|"student", "model": ModelConfig,
                           "student": StudentConfig, "teacher": provenance, "training": {...}}
    model.safetensors     the weights; a teacher-preserving student also carries its frozen
                          teacher under "teacher.*", so nothing outside the folder is needed
    tokenizer.json        (+ tokenizer_config.json with the chat template, when known)
    README.md             a model card generated from the training metrics

A "model" directory is also an ordinary kforcing model directory (checkpoint.load_model reads it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kforcing.core.config import ModelConfig, from_dict, load_json
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    load_model,
    model_state,
    resolve_model_dir,
)
from kforcing.students.pushforward import PushForward
from kforcing.students.store import (
    SHARED_FORMAT,
    STUDENT_JSON,
    is_student_dir,
    load_student,
    resolve_student_dir,
    shareable_state,
    shared_kind,
)

FORMAT, FORMAT_VERSION = SHARED_FORMAT, 1
TOKENIZER_CONFIG = "tokenizer_config.json"


# -- save ------------------------------------------------------------------------------------------

def save(obj: Transformer | PushForward | str | Path, path: str | Path) -> Path:
    """Write a shareable directory for a model or student (see the module docstring)."""
    out = Path(path)
    info = _describe(obj)
    model = info["object"]
    if isinstance(model, PushForward):
        tensors = shareable_state(model)
        config = {"kind": "student", "model": asdict(model.model_config),
                  "student": asdict(model.config)}
    elif isinstance(model, Transformer):
        tensors, config = model_state(model), {"kind": "model", "model": asdict(model.config)}
    else:
        raise KForcingError(f"kforcing.save expects a model, a student or a checkpoint path, got "
                            f"{type(model).__name__}")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_name": "kforcing",
              **config, "teacher": info["teacher"], "training": info["training"]}
    atomic_save_tensors(out / MODEL_FILE, tensors, metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_FILE, config)
    for name, src in info["files"].items():
        if src is not None and Path(src).resolve() != (out / name).resolve():
            atomic_write_bytes(out / name, Path(src).read_bytes())
    atomic_write_bytes(out / "README.md", model_card(config).encode())
    return out


def _describe(obj) -> dict[str, Any]:
    """The object to save plus what is known about it: teacher provenance, training stages and
    the tokenizer files, read from the checkpoint directories when obj is a path."""
    info: dict[str, Any] = {"object": obj, "teacher": {}, "training": {}, "files": {}}
    if not isinstance(obj, (str, Path)):
        if isinstance(obj, PushForward):
            info["training"] = {"max_k": obj.config.max_k, "cdf_order": obj.config.cdf_order}
        return info
    if shared_kind(obj) is not None:                        # already a shareable directory
        cfg = load_json(Path(obj) / CONFIG_FILE)
        return {**info, "object": load(obj), "teacher": cfg.get("teacher", {}),
                "training": cfg.get("training", {}), "files": _tokenizer_files(Path(obj))}
    if is_student_dir(obj):
        d = resolve_student_dir(obj)
        meta = load_json(d / STUDENT_JSON)
        info["object"] = load_student(d)
        teacher_dir = Path(meta["teacher"])
        stages = _stages(d)
        last = stages[-1] if stages else {}
        info["training"] = {
            "max_k": meta["student"]["max_k"], "cdf_order": meta["student"]["cdf_order"],
            "layout": meta["student"]["layout"], "head": meta["student"]["head"],
            "tau_range": [last.get("tau_min"), last.get("tau_max")] if last else None,
            "stages": stages}
        info["teacher"] = _teacher_provenance(teacher_dir)
        info["files"] = {**_tokenizer_files(teacher_dir), **_tokenizer_files(d)}
        return info
    mdir = resolve_model_dir(obj)
    info["object"] = load_model(mdir)
    info["teacher"] = _teacher_provenance(mdir)
    top = Path(obj) if Path(obj).is_dir() else mdir
    info["files"] = {**_tokenizer_files(top), **_tokenizer_files(mdir)}
    return info


def _tokenizer_files(d: Path) -> dict[str, Path]:
    return {n: d / n for n in (TOKENIZER_FILE, TOKENIZER_CONFIG) if (d / n).is_file()}


def _teacher_provenance(teacher_dir: Path) -> dict[str, Any]:
    try:
        mdir = resolve_model_dir(teacher_dir)
        cfg = load_json(mdir / CONFIG_FILE)
    except KForcingError:
        return {"dir": str(teacher_dir)}
    m = cfg.get("model", {})
    # a teacher trained here has no recorded source: name it after its run directory
    run = mdir.parent.parent if mdir.parent.name == "checkpoints" else mdir
    source = cfg.get("source") or {"format": "kforcing", "name": run.resolve().name}
    return {"dir": str(teacher_dir), "source": source,
            "n_layer": m.get("n_layer"), "dim": m.get("dim"), "vocab_size": m.get("vocab_size")}


def _run_dir(student_dir: Path) -> Path:
    """A checkpoint's run directory (where metrics.jsonl lives)."""
    if student_dir.parent.name == "checkpoints":
        return student_dir.parent.parent
    return student_dir


def _stages(student_dir: Path, depth: int = 0) -> list[dict[str, Any]]:
    """The distillation stages that made this student, oldest first, following `init` links."""
    meta = load_json(student_dir / STUDENT_JSON)
    cfg = meta.get("distill", {})
    stage = {"k": meta.get("k"), "target": cfg.get("target"), "steps": meta.get("step"),
             "tau_min": cfg.get("tau_min"), "tau_max": cfg.get("tau_max"),
             "block_size": cfg.get("block_size"), "data": cfg.get("data") or "teacher samples",
             "train_last_blocks": cfg.get("train_last_blocks")}
    metrics = _run_dir(student_dir) / "metrics.jsonl"
    if metrics.is_file():
        vals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "val" in r]
        if vals:
            stage["minutes"] = vals[-1]["minutes"]
            stage["val"] = {t: {m: v[m] for m in ("first", "joint")}
                            for t, v in vals[-1]["val"].items()}
            stage["val_start"] = {t: {m: v[m] for m in ("first", "joint")}
                                  for t, v in vals[0]["val"].items()}
    prev: list[dict[str, Any]] = []
    if cfg.get("init") and depth < 8:
        try:
            prev = _stages(resolve_student_dir(cfg["init"]), depth + 1)
        except KForcingError:
            prev = [{"init": cfg["init"], "note": "previous stage not found"}]
    return prev + [stage]


# -- model card ------------------------------------------------------------------------------------

def model_card(config: dict[str, Any]) -> str:
    """README.md: Hub front matter, what the checkpoint is, how it was trained, how to use it."""
    m, t, tr = config["model"], config.get("teacher") or {}, config.get("training") or {}
    src = t.get("source") or {}
    student = config["kind"] == "student"
    name = src.get("name") or "a kforcing teacher"
    lines = ["---", "library_name: kforcing", "pipeline_tag: text-generation",
             "tags:", "- kforcing", "- text-generation"]
    if student:
        lines += ["- push-forward", "- multi-token-prediction", "- distillation"]
    lines += ["---", ""]
    params = _param_count(m)
    if student:
        s = config["student"]
        lines += [f"# K-Forcing student of {name}", "",
                  f"A push-forward student that emits up to k={s['max_k']} tokens per forward "
                  f"pass: it maps (context, uniforms u_1..u_k, temperature) to the next k tokens "
                  f"its teacher would sample with those uniforms (layout `{s['layout']}`, head "
                  f"`{s['head']}`, CDF order `{s['cdf_order']}`).", ""]
    else:
        lines += [f"# {name} (kforcing format)", "",
                  "An autoregressive Llama-style decoder in the kforcing layout.", ""]
    lines += ["| | |", "|---|---|",
              f"| layers x width | {m['n_layer']} x {m['dim']} ({m['n_head']} heads, "
              f"{m['n_kv_head']} KV heads) |",
              f"| vocabulary | {m['vocab_size']} |", f"| context | {m['max_seq_len']} |",
              f"| parameters (backbone) | {params / 1e6:.1f}M |"]
    if src:
        label = ": ".join(str(v) for v in (src.get("format"), src.get("name")) if v)
        lines.append(f"| teacher source | {label or 'unknown'} |")
        if src.get("sha256"):
            lines.append(f"| teacher file sha256 | `{src['sha256'][:16]}...` |")
    if tr.get("tau_range"):
        lines.append(f"| training tau range | {tr['tau_range'][0]} to {tr['tau_range'][1]} |")
    lines.append("")
    stages = tr.get("stages") or []
    if stages:
        lines += ["## Training stages", "",
                  "Match = fraction of held-out windows where the student's tokens equal the "
                  "teacher's exact autoregressive sample with the same uniforms (first token / "
                  "whole window), at tau = 1.", "",
                  "| stage | k | target | steps | minutes | data | match first | match joint |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, st in enumerate(stages, 1):
            v = (st.get("val") or {}).get("tau1", {})
            lines.append(f"| {i} | {st.get('k')} | {st.get('target')} | {st.get('steps')} | "
                         f"{st.get('minutes', '')} | {Path(str(st.get('data'))).name} | "
                         f"{_pct(v.get('first'))} | {_pct(v.get('joint'))} |")
        lines.append("")
    lines += ["## Use", "", "```python", "import kforcing",
              "from kforcing.decoding.generate import generate",
              "from kforcing.io.tokenizers import load_tokenizer",
              "", 'model = kforcing.load("path/to/this/folder")',
              'tok = load_tokenizer("path/to/this/folder")',
              'res = generate(model, [tok.encode("Once upon a time").ids], 64, seed=0)',
              "print(tok.decode(res.tokens[0]))", "```", "",
              "or `kforcing generate --model path/to/this/folder --prompt \"...\"`"
              + (" / `kforcing chat --model ... --mode kforcing`." if student else "."), "",
              "Generated by `kforcing.save`; the numbers above are read from the training "
              "metrics, not written by hand.", ""]
    return "\n".join(lines)


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _param_count(m: dict[str, Any]) -> int:
    return from_dict(ModelConfig, m).num_params()


# -- load ------------------------------------------------------------------------------------------

def load(path: str | Path, *, device: str | torch.device = "cpu") -> Transformer | PushForward:
    """A model or student from a shareable directory (plain kforcing model directories and
    distillation checkpoints too). A missing or corrupt weight file, or a config of another
    architecture, is a KForcingError."""
    d = Path(path)
    if not d.is_dir():
        raise KForcingError(f"checkpoint not found: {path}")
    if is_student_dir(d):
        return load_student(d, device=device)
    d = resolve_model_dir(d) if not (d / CONFIG_FILE).is_file() else d
    cfg = load_json(d / CONFIG_FILE)
    if "model" not in cfg:
        arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type") or "unknown"
        raise KForcingError(f"{d / CONFIG_FILE} is not a kforcing checkpoint (architecture "
                            f"'{arch}'); import it first with `kforcing import`")
    if not (d / MODEL_FILE).is_file():
        raise KForcingError(f"missing weights file: {d / MODEL_FILE}")
    if cfg.get("kind", "model") != "model":
        raise KForcingError(f"{d / CONFIG_FILE}: unknown checkpoint kind {cfg.get('kind')!r}")
    return load_model(d, device=device)
