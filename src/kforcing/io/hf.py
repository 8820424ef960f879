"""Hugging Face interop for the Llama family (Llama 2/3, Mistral, SmolLM, TinyLlama, Qwen2):
our fused layout <-> `LlamaForCausalLM` / `Qwen2ForCausalLM`.

Conversion works on plain state dicts and config dicts, so importing and exporting directories
needs only safetensors; `transformers` is needed only to build an in-memory HF model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kforcing.core.config import ModelConfig, load_json
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    TOKENIZER_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    load_state,
    load_tensors,
    save_model,
)

# model_type -> the transformers class we export to; all are the same decoder up to q/k/v biases
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A transformers config dict (Llama, Mistral, Qwen2) -> ModelConfig; errors name what we
    cannot represent."""
    mtype = hf.get("model_type", "llama")
    if mtype not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(hf.get("architectures") or []) or "?"
        raise KForcingError(f"unsupported architecture '{mtype}' ({arch}): kforcing imports "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
    qkv_bias = mtype == "qwen2" or bool(hf.get("attention_bias"))
    if mtype != "qwen2" and hf.get("attention_bias"):
        raise KForcingError(f"{mtype} checkpoint with attention_bias (biases on o_proj too) is "
                            "not supported; only Qwen2-style q/k/v biases are")
    if hf.get("mlp_bias"):
        raise KForcingError("checkpoint uses MLP biases, which the Llama backbone lacks")
    if hf.get("use_sliding_window"):
        raise KForcingError("checkpoint uses sliding-window attention, which is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise KForcingError(f"unsupported activation '{hf['hidden_act']}' (expected silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise KForcingError(f"unsupported RoPE scaling '{rope_type}' (default and llama3 only)")
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in _LLAMA3_ROPE_KEYS if k in rope}
        if len(scaling) != len(_LLAMA3_ROPE_KEYS):
            raise KForcingError(f"llama3 RoPE scaling needs {', '.join(_LLAMA3_ROPE_KEYS)}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    if head_dim * n_head != hf["hidden_size"]:
        raise KForcingError(f"head_dim {head_dim} x {n_head} heads != hidden_size "
                            f"{hf['hidden_size']}: not supported")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, dim=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        eos_id=eos, attention_bias=qkv_bias, rope_scaling=scaling)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen2 when the q/k/v projections have biases (Llama's attention_bias also biases o_proj),
    Llama otherwise."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **cfg.rope_scaling}
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": None, "eos_token_id": cfg.eos_id, "pad_token_id": None,
        "torch_dtype": "float32", "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = rope          # the key transformers 4.x reads
    if cfg.attention_bias:
        out.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                   use_sliding_window=False, sliding_window=None)
        del out["attention_bias"], out["mlp_bias"], out["head_dim"]
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in sd:
            raise KForcingError(f"Hugging Face checkpoint lacks tensor '{name}'")
        return sd[name]

    out = {"tok_embeddings.weight": get("model.embed_tokens.weight"),
           "norm.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["output.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attn.wqkv.weight"] = torch.cat(
            [get(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
        if cfg.attention_bias:
            out[q + "attn.wqkv.bias"] = torch.cat(
                [get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0)
        out[q + "attn.wo.weight"] = get(p + "self_attn.o_proj.weight")
        out[q + "mlp.w13.weight"] = torch.cat(
            [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], dim=0)
        out[q + "mlp.w2.weight"] = get(p + "mlp.down_proj.weight")
        out[q + "attn_norm.weight"] = get(p + "input_layernorm.weight")
        out[q + "mlp_norm.weight"] = get(p + "post_attention_layernorm.weight")
    return out


def state_dict_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    cfg, sd = model.config, model.state_dict()
    sizes = [cfg.n_head * cfg.head_dim] + [cfg.n_kv_head * cfg.head_dim] * 2
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
           "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        wq, wk, wv = sd[q + "attn.wqkv.weight"].split(sizes, dim=0)
        gate, up = sd[q + "mlp.w13.weight"].split(cfg.intermediate_size, dim=0)
        out.update({
            p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight":
                sd[q + "attn.wo.weight"],
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": sd[q + "mlp.w2.weight"],
            p + "input_layernorm.weight": sd[q + "attn_norm.weight"],
            p + "post_attention_layernorm.weight": sd[q + "mlp_norm.weight"],
        })
        if cfg.attention_bias:
            bq, bk, bv = sd[q + "attn.wqkv.bias"].split(sizes, dim=0)
            out.update({p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk,
                        p + "self_attn.v_proj.bias": bv})
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_model(hf_model) -> Transformer:
    """An in-memory transformers Llama / Mistral / Qwen2 causal LM -> our Transformer (fp32,
    eval mode)."""
    cfg = config_from_hf(hf_model.config.to_dict())
    return _build(cfg, {k: v.float() for k, v in hf_model.state_dict().items()})


def to_hf_model(model: Transformer):
    """Our Transformer -> transformers LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases)
    with the same weights."""
    try:
        import transformers
    except ImportError:
        raise KForcingError("transformers is not installed: pip install 'kforcing[hf]'") from None
    hf_cfg = config_to_hf(model.config)
    arch = hf_cfg.pop("architectures")[0]
    hf_cfg.pop("model_type"), hf_cfg.pop("torch_dtype")
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    hf = getattr(transformers, arch)(config_cls(**hf_cfg))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise KForcingError(f"HF export mismatch: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}")
    return hf.eval()


def _build(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(cfg)
    load_state(model, state_dict_from_hf(hf_sd, cfg), "Hugging Face checkpoint")
    return model.eval()


def read_hf_dir(src: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config.json + model.safetensors (or a sharded index) from a local directory."""
    src = Path(src)
    if not src.is_dir():
        raise KForcingError(f"Hugging Face model directory not found: {src}")
    cfg = config_from_hf(load_json(src / "config.json"))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(load_json(index)["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise KForcingError(f"no model.safetensors in {src} (pickled .bin weights are refused)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_tensors(src / f))
    return cfg, {k: v.float() for k, v in sd.items()}


def load_hf_dir(src: str | Path) -> Transformer:
    cfg, sd = read_hf_dir(src)
    return _build(cfg, sd)


def import_hf_dir(src: str | Path, out: str | Path) -> Path:
    """Convert a local Hugging Face Llama directory into a kforcing model directory."""
    src = Path(src)
    model = load_hf_dir(src)
    tok = src / TOKENIZER_FILE
    return save_model(model, out, tokenizer=tok if tok.is_file() else None,
                      extra={"source": {"format": "hf", "path": str(src)}})


def export_hf(model: Transformer, out: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """Write a directory that `LlamaForCausalLM.from_pretrained(out)` loads."""
    out = Path(out)
    atomic_save_tensors(out / "model.safetensors", state_dict_to_hf(model),
                        metadata={"format": "pt"})
    atomic_write_json(out / "config.json", config_to_hf(model.config))
    atomic_write_json(out / "generation_config.json",
                      {"eos_token_id": model.config.eos_id, "do_sample": False})
    if tokenizer is not None:
        atomic_write_bytes(out / TOKENIZER_FILE, Path(tokenizer).read_bytes())
        eos = _eos_token(Path(tokenizer), model.config.eos_id)
        atomic_write_bytes(out / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
             "model_max_length": model.config.max_seq_len}, indent=2).encode())
    return out


def _eos_token(tokenizer_file: Path, eos_id: int | None) -> str | None:
    if eos_id is None:
        return None
    vocab = json.loads(tokenizer_file.read_text()).get("added_tokens", [])
    return next((t["content"] for t in vocab if t["id"] == eos_id), None)
