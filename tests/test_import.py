"""Real-teacher import: tiny random Llama / Qwen2 / GGUF checkpoints written by the tests
themselves (nothing downloaded) convert exactly, and shareable checkpoints round-trip."""

import json

import numpy as np
import pytest
import torch

import kforcing
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model

transformers = pytest.importorskip("transformers")
from kforcing.io.hf import from_hf_model, to_hf_model  # noqa: E402
from kforcing.io.hub import import_teacher, load_gguf, render_chat  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")


def _perturb(model):
    """Random init leaves norms at 1 and biases at 0: make them distinct so mix-ups show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _qwen2(tie=True):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, eos_token_id=5)
    return _perturb(transformers.Qwen2ForCausalLM(cfg))


def _llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=5, **kw)
    return _perturb(transformers.LlamaForCausalLM(cfg))


def _same_as_hf(hf, ours, vocab=128, new=12):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4
    from kforcing.core.sampling import SamplingConfig
    from kforcing.decoding.ar import generate_ar
    prompt = ids[:1, :8]
    ref = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, 8:].tolist()
    got = generate_ar(ours, [prompt[0].tolist()], new, sampling=SamplingConfig(temperature=0),
                      stop_at_eos=False).tokens[0]
    assert got == ref


@pytest.mark.parametrize("tie", [True, False])
def test_qwen2_biases_import_exactly_and_round_trip(tmp_path, tie):
    hf = _qwen2(tie)
    hf.save_pretrained(tmp_path / "hf")
    out = import_teacher(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(out)
    assert ours.config.attention_bias and ours.layers[0].attn.wqkv.bias is not None
    _same_as_hf(hf, ours)
    back = to_hf_model(ours)
    assert type(back).__name__ == "Qwen2ForCausalLM"
    ref = hf.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert json.loads((out / "config.json").read_text())["source"]["architecture"] == "qwen2"


def test_llama3_rope_scaling_matches_transformers():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 5e5}
    hf = _llama(rope_parameters=rope, rope_scaling=rope)
    ours = from_hf_model(hf)
    assert ours.config.rope_scaling["factor"] == 8.0
    _same_as_hf(hf, ours)
    assert (to_hf_model(ours)(torch.arange(40)[None]).logits -
            hf(torch.arange(40)[None]).logits).abs().max() < 1e-4


def test_default_path_has_no_bias_and_old_configs_load(make_model, tmp_path):
    model = make_model()
    assert model.layers[0].attn.wqkv.bias is None
    from kforcing.io.checkpoint import save_model
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    # a checkpoint written before these fields existed still loads
    del cfg["model"]["attention_bias"], cfg["model"]["rope_scaling"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(ids), model(ids))


def test_other_architectures_fail_in_one_line(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(KForcingError, match=r"unsupported architecture 'gpt2' \(GPT2LMHeadModel\)"
                       ) as e:
        import_teacher(d, tmp_path / "out")
    assert "\n" not in str(e.value)
    with pytest.raises(KForcingError, match="not found"):
        import_teacher(tmp_path / "nope.gguf", tmp_path / "out")


# -- GGUF ---------------------------------------------------------------------------------------

def _write_gguf(path, hf, tokenizer_json: dict, arch: str = "llama"):
    """A float32 GGUF of a HF Llama model, laid out as llama.cpp's converter writes it (q/k rows
    permuted for its interleaved RoPE), with a byte-level BPE vocabulary and a chat template."""
    gguf = pytest.importorskip("gguf")
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tokenizer_json["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tokenizer_json["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    merges = tokenizer_json["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer_json["model"]["vocab"]["<|im_start|>"])
    w.add_eos_token_id(tokenizer_json["model"]["vocab"]["<|im_end|>"])
    w.add_chat_template(CHAT_TEMPLATE)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2
                                                                                    ).reshape(t.shape)

    sd = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf_name, g_name in names.items():
            w.add_tensor(f"blk.{i}.{g_name}.weight", sd[p + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path, tiny_corpus):
    from tokenizers import AddedToken

    from kforcing.io.tokenizers import load_tokenizer
    tok = load_tokenizer(tiny_corpus.tokenizer_path)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True),
                            AddedToken("<|im_end|>", special=True)])
    tok_json = json.loads(tok.to_str())
    # GGUF stores added tokens inside the vocabulary
    for t in tok_json["added_tokens"]:
        tok_json["model"]["vocab"][t["content"]] = t["id"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok_json["model"]["vocab"]), hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = _perturb(transformers.LlamaForCausalLM(cfg))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, tok_json)
    return path, hf


def test_gguf_import_matches_source_model_and_tokenizer(tiny_gguf, tmp_path):
    path, hf = tiny_gguf
    loaded, hf_tok = load_gguf(path)
    out = import_teacher(path, tmp_path / "teacher")
    ours = load_model(out)
    assert ours.config.vocab_size == hf.config.vocab_size
    _same_as_hf(hf, ours, vocab=hf.config.vocab_size)           # the original, f32 weights
    _same_as_hf(loaded, ours, vocab=hf.config.vocab_size)       # what transformers read
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["format"] == "gguf" and len(cfg["source"]["sha256"]) == 64
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    # our tokenizer.json encodes and renders the chat exactly like transformers' tokenizer
    from kforcing.io.tokenizers import load_tokenizer
    tok = load_tokenizer(out)
    msgs = [{"role": "user", "content": "The river was quiet."}]
    text = render_chat(tok_cfg, msgs)
    assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False).ids == \
        hf_tok(text, add_special_tokens=False)["input_ids"]


def test_gguf_other_architecture_and_corrupt_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KForcingError, match="unsupported architecture 'gpt2'"):
        load_gguf(tmp_path / "g.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(KForcingError, match="corrupt GGUF"):
        import_teacher(tmp_path / "bad.gguf", tmp_path / "out")


# -- shareable checkpoints ------------------------------------------------------------------------

def _student(saved_tiny_model, layout):
    from kforcing.students.pushforward import PushForward, StudentConfig
    teacher = load_model(saved_tiny_model)
    torch.manual_seed(3)
    student = PushForward(teacher, StudentConfig(max_k=2, layout=layout, head="inverse-cdf"))
    with torch.no_grad():   # move the student away from its teacher
        for p in student.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return student.eval()


@pytest.mark.parametrize("layout", ["shared", "teacher-preserving"])
def test_save_load_reproduces_generation_bit_for_bit(saved_tiny_model, tmp_path, layout):
    from kforcing.decoding.generate import generate
    student = _student(saved_tiny_model, layout)
    out = kforcing.save(student, tmp_path / "shared")
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (out / name).is_file()
    again = kforcing.load(out)
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(student, prompts, 12, k=2, seed=7, temperature=0.9, stop_at_eos=False)
    b = generate(again, prompts, 12, k=2, seed=7, temperature=0.9, stop_at_eos=False)
    assert a.tokens == b.tokens
    sa, sb = student.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_from_a_distillation_run_records_training(saved_tiny_model, tiny_corpus, tmp_path):
    from kforcing.decoding.generate import generate
    from kforcing.students.pushforward import StudentConfig
    from kforcing.students.store import load_student
    from kforcing.training.distill import DistillConfig, distill
    cfg = DistillConfig(teacher=str(saved_tiny_model), data=str(tiny_corpus.dir),
                        out_dir=str(tmp_path / "run"), k=1, max_steps=2, time_budget_min=None,
                        block_size=16, windows=4, batch_size=2, eval_contexts=8,
                        student=StudentConfig(max_k=2), train_last_blocks=1)
    distill(cfg, progress=False)
    out = kforcing.save(tmp_path / "run", tmp_path / "shared")
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "student" and meta["training"]["max_k"] == 2
    assert meta["training"]["tau_range"] == [0.7, 1.0]
    assert meta["training"]["stages"][0]["steps"] == 2
    assert meta["teacher"]["dir"] == str(saved_tiny_model.resolve())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: kforcing") and "| 1 | 1 | self-forcing | 2 |" in card
    assert (out / "tokenizer.json").is_file()
    # the shareable directory works wherever a student directory does
    orig, again = load_student(tmp_path / "run"), load_student(out)
    a = generate(orig, [[1, 2]], 6, k=2, seed=1, stop_at_eos=False)
    b = generate(again, [[1, 2]], 6, k=2, seed=1, stop_at_eos=False)
    assert a.tokens == b.tokens


def test_train_last_blocks_freezes_the_rest(saved_tiny_model, tiny_corpus, tmp_path):
    from kforcing.students.pushforward import StudentConfig
    from kforcing.training.distill import DistillConfig, Distiller
    cfg = DistillConfig(teacher=str(saved_tiny_model), data=str(tiny_corpus.dir),
                        out_dir=str(tmp_path / "run"), k=1, max_steps=1, block_size=16,
                        windows=4, batch_size=2, eval_contexts=8, student=StudentConfig(max_k=2),
                        train_last_blocks=1, grad_checkpoint=True)
    d = Distiller(cfg, progress=False)
    before = {k: v.clone() for k, v in d.student.backbone.state_dict().items()}
    d.fit(stop_after=1)
    after = d.student.backbone.state_dict()
    assert torch.equal(before["layers.0.mlp.w2.weight"], after["layers.0.mlp.w2.weight"])
    assert torch.equal(before["tok_embeddings.weight"], after["tok_embeddings.weight"])
    assert not torch.equal(before["layers.1.mlp.w2.weight"], after["layers.1.mlp.w2.weight"])


def test_data_free_distillation_samples_the_teacher(saved_tiny_model, tmp_path):
    from kforcing.students.pushforward import StudentConfig
    from kforcing.training.distill import DistillConfig, Distiller
    cfg = DistillConfig(teacher=str(saved_tiny_model), data_free=True, data_free_tokens=512,
                        out_dir=str(tmp_path / "run"), k=1, max_steps=1, block_size=8,
                        windows=4, batch_size=2, eval_contexts=8, student=StudentConfig(max_k=2))
    d = Distiller(cfg, progress=False)
    corpus = d.loader.token_file.path.parent
    assert len(d.loader.token_file) >= 512
    d.fit(stop_after=1)
    # cached: a second stage reuses the same samples instead of generating them again
    cfg.out_dir = str(tmp_path / "run2")
    again = Distiller(cfg, progress=False)
    assert again.loader.token_file.path.parent == corpus
    with pytest.raises(KForcingError, match="--data-free"):
        Distiller(DistillConfig(teacher=str(saved_tiny_model), out_dir=str(tmp_path / "r3"),
                                student=StudentConfig(max_k=2)), progress=False)


def test_load_errors_are_one_line(saved_tiny_model, tmp_path, make_model):
    out = kforcing.save(make_model(), tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(KForcingError, match="corrupt weights"):
        kforcing.load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(KForcingError, match="missing weights"):
        kforcing.load(out)
    (out / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                 "model_type": "gpt2"}))
    with pytest.raises(KForcingError, match="GPT2LMHeadModel") as e:
        kforcing.load(out)
    assert "\n" not in str(e.value)


def test_cli_import_and_chat(tiny_gguf, tmp_path, capsys):
    from kforcing.cli.main import main
    path, _ = tiny_gguf
    assert main(["import", str(path), "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main(["chat", "--model", str(tmp_path / "t"), "--prompt", "Hello",
                 "--max-new-tokens", "5"]) == 0
    assert main(["chat", "--model", str(tmp_path / "t"), "--mode", "kforcing", "--prompt",
                 "Hi"]) == 1
    assert "needs a K-Forcing student" in capsys.readouterr().err
