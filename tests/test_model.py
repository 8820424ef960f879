"""Model, KV cache and config: cached decoding must reproduce the plain forward exactly."""

from __future__ import annotations

import pytest
import torch

from kforcing.core.config import MODEL_PRESETS, ModelConfig, TrainConfig, from_dict
from kforcing.core.kv_cache import KVCache
from kforcing.core.model import Transformer, causal_mask
from kforcing.decoding.common import prefill
from kforcing.errors import KForcingError

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def random_ids(n: int, vocab: int = 256, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


# ----------------------------------------------------------------------------- cached decoding


@torch.inference_mode()
def test_cached_decode_matches_uncached_forward(make_model):
    model = make_model()
    ids = random_ids(12, batch=2)
    full = model(ids)  # (2, 12, V), plain causal forward
    cache = KVCache.for_model(model, batch_size=2, max_len=12)
    # prefill the first 5 tokens in one pass, then one token per pass
    out = [model(ids[:, :5], cache=cache)]
    assert cache.length == 5
    for t in range(5, 12):
        out.append(model(ids[:, t : t + 1], cache=cache))
        assert cache.length == t + 1
    cached = torch.cat(out, dim=1)
    assert cached.dtype == torch.float32
    assert max_diff(cached, full) < TOL


@torch.inference_mode()
def test_last_only_and_return_hidden(make_model):
    model = make_model()
    ids = random_ids(7)
    full = model(ids)
    assert max_diff(model(ids, last_only=True), full[:, -1:]) < TOL
    hidden = model(ids, return_hidden=True)
    assert hidden.shape == (1, 7, model.config.dim)
    assert max_diff(model.output(hidden), full) < TOL


@torch.inference_mode()
def test_ragged_left_padded_batch_matches_rows_alone(make_model):
    model = make_model()
    prompts = [[5, 17, 200], [1, 2, 3, 4, 5, 6, 7], [250, 9, 9, 31, 64]]
    continuations = [[11, 12, 13, 14], [0, 255, 7, 7], [100, 101, 102, 103]]
    n_new = len(continuations[0])
    P = max(len(p) for p in prompts)
    cache = KVCache.for_model(model, len(prompts), max_len=P + n_new)
    pre = prefill(model, cache, prompts)
    assert cache.has_padding
    assert pre.next_pos.tolist() == [len(p) for p in prompts]
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p]))[0, -1]
        assert max_diff(pre.logits[b], alone) < TOL
    pos = pre.next_pos
    for step in range(n_new):
        tok = torch.tensor([c[step] for c in continuations])
        logits = model(tok[:, None], input_pos=pos[:, None], cache=cache)[:, -1]
        pos = pos + 1
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + continuations[b][: step + 1]]))[0, -1]
            assert max_diff(logits[b], alone) < TOL, (b, step)


@torch.inference_mode()
def test_ragged_multi_token_pass_after_padding(make_model):
    """A T > 1 pass (as K-Forcing makes) over a padded cache also matches each row alone."""
    model = make_model(seed=3)
    prompts = [[8, 9], [40, 41, 42, 43, 44]]
    extra = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cache = KVCache.for_model(model, 2, max_len=8)
    pre = prefill(model, cache, prompts)
    pos = pre.next_pos[:, None] + torch.arange(3)[None]
    logits = model(extra, input_pos=pos, cache=cache)
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p + extra[b].tolist()]))[0, len(p) :]
        assert max_diff(logits[b], alone) < TOL


@torch.inference_mode()
def test_custom_causal_mask_equals_default(make_model):
    model = make_model()
    ids = random_ids(9, batch=2)
    ref = model(ids)
    mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    assert max_diff(model(ids, mask=mask[None, None]), ref) < TOL
    assert max_diff(model(ids, mask=mask[None]), ref) < TOL  # 3-D masks are accepted
    assert torch.equal(causal_mask(9), mask[None, None])


@torch.inference_mode()
def test_mask_actually_restricts_attention(make_model):
    """Sanity check of the mask path: hiding token 0 from the last query changes its logits."""
    model = make_model()
    ids = random_ids(6)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    mask[5, 0] = False
    ref, masked = model(ids), model(ids, mask=mask[None, None])
    assert max_diff(masked[:, :5], ref[:, :5]) < TOL
    assert max_diff(masked[:, 5], ref[:, 5]) > 1e-4


@torch.inference_mode()
def test_embeds_path_equals_idx_path(make_model):
    model = make_model()
    ids = random_ids(10, batch=2)
    assert torch.equal(model(embeds=model.tok_embeddings(ids)), model(ids))
    # also with a cache
    c1 = KVCache.for_model(model, 2, max_len=10)
    c2 = KVCache.for_model(model, 2, max_len=10)
    a = model(ids, cache=c1)
    b = model(embeds=model.tok_embeddings(ids), cache=c2)
    assert torch.equal(a, b)
    assert all(map(torch.equal, c1.k + c1.v, c2.k + c2.v))


@torch.inference_mode()
def test_commit_keeps_only_first_slots(make_model):
    model = make_model()
    vocab = model.config.vocab_size
    prompt, kept, nxt = random_ids(5, seed=1), torch.tensor([[42]]), torch.tensor([[7]])
    cache = KVCache.for_model(model, 1, max_len=10)
    model(prompt, cache=cache)
    # one real token plus two noise vectors; only the real token is committed
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 2, model.config.dim, generator=g)
    embeds = torch.cat([model.tok_embeddings(kept), noise], dim=1)
    out = model(embeds=embeds, cache=cache, commit=1)
    assert out.shape == (1, 3, vocab)
    assert cache.length == 6
    # the committed token's logits do not depend on the noise after it (causal)
    ref_kept = model(torch.cat([prompt, kept], 1))[:, -1]
    assert max_diff(out[:, 0], ref_kept) < TOL
    # the next pass overwrites the scratch slots: as if the noise had never been fed
    got = model(nxt, cache=cache)[:, -1]
    assert cache.length == 7
    ref = model(torch.cat([prompt, kept, nxt], 1))[:, -1]
    assert max_diff(got, ref) < TOL


@torch.inference_mode()
def test_commit_zero_and_tokens(make_model):
    model = make_model()
    prompt = random_ids(4, seed=2)
    cache = KVCache.for_model(model, 1, max_len=10)
    model(prompt, cache=cache)
    model(torch.tensor([[1, 2, 3]]), cache=cache, commit=0)
    assert cache.length == 4
    got = model(torch.tensor([[9, 8]]), cache=cache, commit=2)
    assert cache.length == 6
    ref = model(torch.cat([prompt, torch.tensor([[9, 8]])], 1))[:, -2:]
    assert max_diff(got, ref) < TOL


@torch.inference_mode()
def test_truncate_rollback_then_refeed_is_identical(make_model):
    model = make_model()
    ids = random_ids(9, seed=4)
    cache = KVCache.for_model(model, 1, max_len=9)
    model(ids[:, :6], cache=cache)
    first = [model(ids[:, t : t + 1], cache=cache) for t in range(6, 9)]
    assert cache.length == 9
    cache.truncate(6)
    assert cache.length == 6
    again = [model(ids[:, t : t + 1], cache=cache) for t in range(6, 9)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    # rolling back and feeding different tokens then the original ones also recovers exactly
    cache.truncate(6)
    model(torch.tensor([[3, 3, 3]]), cache=cache)
    cache.truncate(6)
    third = [model(ids[:, t : t + 1], cache=cache) for t in range(6, 9)]
    for a, b in zip(first, third, strict=True):
        assert torch.equal(a, b)


def test_truncate_bounds():
    cache = KVCache(1, 1, 1, 2, max_len=4)
    cache.commit(3)
    with pytest.raises(KForcingError, match="cannot truncate"):
        cache.truncate(4)
    with pytest.raises(KForcingError, match="cannot truncate"):
        cache.truncate(-1)
    cache.truncate(0)
    assert cache.length == 0


def test_cache_write_stores_and_returns_values():
    n_layer, B, H, D = 2, 3, 2, 4
    cache = KVCache(n_layer, B, H, D, max_len=8)
    g = torch.Generator().manual_seed(0)
    k1, v1 = torch.randn(B, H, 5, D, generator=g), torch.randn(B, H, 5, D, generator=g)
    k_all, v_all = cache.write(1, k1, v1)
    assert torch.equal(k_all, k1) and torch.equal(v_all, v1)
    cache.commit(5)
    k2, v2 = torch.randn(B, H, 2, D, generator=g), torch.randn(B, H, 2, D, generator=g)
    k_all, v_all = cache.write(1, k2, v2)
    assert k_all.shape == (B, H, 7, D)
    cache.commit(2)
    k_ref, v_ref = torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)
    slots = torch.tensor([6, 0, 3, 5])
    k, v = cache.k[1][:, :, slots], cache.v[1][:, :, slots]
    assert torch.equal(k, k_ref[:, :, slots]) and torch.equal(v, v_ref[:, :, slots])
    # layer 0 was never written
    assert not cache.k[0].any() and not cache.v[0].any()


@torch.inference_mode()
def test_cache_holds_the_models_keys(make_model):
    """After a cached pass, reading slots back gives the K/V that a second pass recomputes."""
    model = make_model()
    ids = random_ids(6, seed=7)
    c1 = KVCache.for_model(model, 1, max_len=6)
    model(ids, cache=c1)
    c2 = KVCache.for_model(model, 1, max_len=6)
    model(ids[:, :3], cache=c2)
    model(ids[:, 3:], cache=c2)
    slots = torch.arange(6)
    for layer in range(model.config.n_layer):
        k1, v1 = c1.k[layer][:, :, slots], c1.v[layer][:, :, slots]
        k2, v2 = c2.k[layer][:, :, slots], c2.v[layer][:, :, slots]
        assert max_diff(k1, k2) < TOL and max_diff(v1, v2) < TOL


@torch.inference_mode()
def test_position_beyond_context_raises(make_model):
    model = make_model(max_seq_len=16)
    with pytest.raises(KForcingError, match="exceeds the model's context of 16"):
        model(random_ids(17))
    with pytest.raises(KForcingError, match="position 16"):
        model(torch.tensor([[1]]), input_pos=torch.tensor([16]))
    model(random_ids(16))  # exactly the context is fine


@torch.inference_mode()
def test_cache_overflow_raises(make_model):
    model = make_model()
    cache = KVCache.for_model(model, 1, max_len=8)
    with pytest.raises(KForcingError, match="KV cache full"):
        model(random_ids(9), cache=cache)
    assert cache.length == 0
    model(random_ids(6), cache=cache)
    with pytest.raises(KForcingError, match="KV cache full"):
        model(random_ids(3), cache=cache)
    assert cache.length == 6
    model(random_ids(2), cache=cache)
    assert cache.length == 8


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"dim": 65, "n_head": 4}, "not divisible by n_head"),
        ({"n_head": 4, "n_kv_head": 3}, "not a multiple of n_kv_head"),
        ({"dim": 12, "n_head": 4, "n_kv_head": 2}, "head_dim must be even"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
        ({"n_layer": -1}, "n_layer must be positive"),
        ({"max_seq_len": 0}, "max_seq_len must be positive"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_model_config_validation(kwargs, msg):
    with pytest.raises(KForcingError, match=msg):
        ModelConfig(**kwargs)


def test_preset_errors_and_overrides():
    with pytest.raises(KForcingError, match="unknown model preset 'huge'.*tiny, small, base"):
        ModelConfig.preset("huge")
    cfg = ModelConfig.preset("tiny", max_seq_len=32)
    assert cfg.max_seq_len == 32 and MODEL_PRESETS["tiny"].max_seq_len == 256
    with pytest.raises(KForcingError, match="not divisible"):
        ModelConfig.preset("tiny", dim=66)
    with pytest.raises(KForcingError, match="unknown field.*bogus"):
        from_dict(ModelConfig, {"dim": 64, "bogus": 1})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 1},
        {"batch_size": 0},
        {"grad_accum": 0},
        {"max_steps": 0},
        {"lr": 0.0},
        {"min_lr": 1.0, "lr": 0.1},
        {"warmup_steps": -1},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"time_budget_min": 0.0},
        {"time_budget_min": float("nan")},
        {"model": "gigantic"},
        {"eval_every": 0},
        {"ckpt_every": 0},
    ],
)
def test_train_config_validation(kwargs):
    with pytest.raises(KForcingError):
        TrainConfig(**kwargs)


def test_train_config_smoke_run_clamps_warmup():
    """issue 13 item 7: `train --max-steps 3` with the default warmup is a valid smoke run."""
    cfg = TrainConfig(max_steps=3)
    assert cfg.warmup_steps > cfg.max_steps


def test_train_config_names_an_unknown_preset_before_schedule_errors():
    with pytest.raises(KForcingError, match="unknown model preset 'gigantic'"):
        TrainConfig(model="gigantic", max_steps=3, warmup_steps=100)


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_matches_tiny(make_model, tie):
    model = make_model(tie_embeddings=tie)
    assert model.config.num_params() == model.num_params()
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert (model.output.weight is model.tok_embeddings.weight) == tie


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 0, 10**6),
        ("small", 5 * 10**6, 10 * 10**6),
        ("base", 80 * 10**6, 150 * 10**6),
    ],
)
def test_num_params_matches_presets(name, low, high):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    actual = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == actual == model.num_params()
    assert low < actual < high
