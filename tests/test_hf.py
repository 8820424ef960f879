"""Hugging Face interop: a random tiny LlamaForCausalLM (nothing downloaded) round-trips."""

import pytest
import torch

from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError

transformers = pytest.importorskip("transformers")
from kforcing.io.hf import (  # noqa: E402
    config_from_hf,
    export_hf,
    from_hf_model,
    import_hf_dir,
    load_hf_dir,
    to_hf_model,
)


def _hf_model(tie: bool) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # random init has tiny norms; perturb them so a mix-up of norm weights would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_hf_to_ours_same_logits_and_back(tie):
    hf = _hf_model(tie)
    ours = from_hf_model(hf)
    assert ours.config.tie_embeddings == tie
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (ref - got).abs().max() < 1e-5
    back = to_hf_model(ours)
    with torch.no_grad():
        again = back(ids).logits
    assert (ref - again).abs().max() < 1e-5
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_export_dir_loads_in_transformers_and_imports_back(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(ModelConfig.preset("tiny", eos_id=3)).eval()
    export_hf(ours, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-5
    re = load_hf_dir(tmp_path / "hf")
    assert re.config == ours.config
    out = import_hf_dir(tmp_path / "hf", tmp_path / "ours")
    from kforcing.io.checkpoint import load_model
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids), ours(ids))


def test_unsupported_configs_name_the_problem():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(KForcingError, match="bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(KForcingError, match="RoPE"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(KForcingError, match="architecture .gpt2."):
        config_from_hf({**base, "model_type": "gpt2"})


def test_missing_dir_and_pickle_refused(tmp_path):
    with pytest.raises(KForcingError, match="not found"):
        load_hf_dir(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(
        '{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, '
        '"num_hidden_layers": 1, "num_attention_heads": 2}')
    (tmp_path / "d" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(KForcingError, match="safetensors"):
        load_hf_dir(tmp_path / "d")
