"""The fast noise, sampling and AR-loop paths give bit-identical noise and tokens to the
computations they replaced (kept here as oracles): the int32 in-place hash against the int64 one,
the Gumbel vectors, uniforms and sampled tokens built from them, and generate_ar against the loop
that drew every token's noise per step with the int64 hash."""

from __future__ import annotations

import pytest
import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, gumbel_max, probs_from_logits, sample
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.common import cut_at_eos, prefill

# -- the int64 hash, as it was before the int32 rewrite (the oracle) ------------------------------

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_U_HI, _U_LO, _GUMBEL = 0x68E31DA4, 0xB5297A4D, 0x1B56C4E9


def _mix64(x):
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _combine64(h, v):
    return _mix64((h ^ ((v * _GOLDEN) & _M32)) & _M32)


def _token_hash64(seeds, index, stream):
    words = [int(s) & ((1 << 64) - 1) for s in seeds]
    lo = torch.tensor([w & _M32 for w in words], dtype=torch.long)
    hi = torch.tensor([w >> 32 for w in words], dtype=torch.long)
    base = _combine64(_mix64(lo), hi)
    h = _combine64(base[:, None].expand_as(index), stream)
    return _combine64(h, index & _M32)


def uniforms64(seeds, index):
    hi = _token_hash64(seeds, index, _U_HI) >> 6
    lo = _token_hash64(seeds, index, _U_LO) >> 5
    return (hi * (1 << 27) + lo).double() / float(1 << 53)


def gumbel64(seeds, index, V):
    h = _token_hash64(seeds, index, _GUMBEL)
    bits = _combine64(h[..., None], torch.arange(V, dtype=torch.long))
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def gumbel_max_old(probs, g):
    return (probs.float().log() + g).argmax(-1)


# seeds across the 64-bit range (negative ones reduce mod 2^64), indices past 2^31 and 2^32
SEEDS = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, (3 << 32) + 12345, 2**64 - 1, -1, -77]
INDEX = torch.tensor([[0, 1, 2, 63, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 9, 2**40 + 3]])


def test_uniforms_equal_the_int64_hash_bitwise():
    index = INDEX.expand(len(SEEDS), -1)
    new = NoiseStream(SEEDS).uniforms(index)
    assert new.dtype == torch.float64
    assert torch.equal(new, uniforms64(SEEDS, index))
    many = torch.arange(4096).expand(3, -1)
    assert torch.equal(NoiseStream([5, 6, 2**40]).uniforms(many), uniforms64([5, 6, 2**40], many))


@pytest.mark.parametrize("V", [1, 7, 256, 8192])
def test_gumbel_equals_the_int64_hash_bitwise(V):
    index = INDEX.expand(len(SEEDS), -1)
    new, old = NoiseStream(SEEDS).gumbel(index, V), gumbel64(SEEDS, index, V)
    assert new.dtype == torch.float32 and new.shape == (len(SEEDS), INDEX.shape[1], V)
    assert torch.equal(new.view(torch.int32), old.view(torch.int32))


def test_gumbel_into_a_reused_buffer_equals_a_fresh_one():
    s = NoiseStream([3, 4])
    buf = torch.full((2, 1, 300), float("nan"))
    for j in (0, 7, 2**33):
        idx = torch.full((2, 1), j)
        assert s.gumbel(idx, 300, out=buf) is buf
        assert torch.equal(buf, gumbel64([3, 4], idx, 300))


def test_gumbel_equal_across_calls_and_row_subsets():
    """The cached per-stream and per-vocabulary state changes nothing between calls."""
    s = NoiseStream([3, 4, 5])
    idx = torch.arange(6).expand(3, -1)
    a, b = s.gumbel(idx, 300), s.gumbel(idx, 300)
    assert torch.equal(a, b)
    assert torch.equal(s.gumbel(idx, 17), a[..., :17])
    assert torch.equal(s.rows([2, 0]).gumbel(idx[:2], 300), a[[2, 0]])


@pytest.mark.parametrize("cfg", [SamplingConfig(coupling="gumbel"),
                                 SamplingConfig(coupling="gumbel", temperature=0.7),
                                 SamplingConfig(coupling="gumbel", temperature=1.3, top_p=0.9),
                                 SamplingConfig(coupling="gumbel", top_k=5)])
def test_gumbel_sampling_equals_the_old_computation(cfg):
    g = torch.Generator().manual_seed(0)
    V = 1000
    logits = torch.randn(64, V, generator=g) * 3
    idx = torch.arange(64)[:, None]
    noise = NoiseStream(range(64)).gumbel(idx, V)[:, 0]
    old = gumbel_max_old(probs_from_logits(logits, cfg), gumbel64(range(64), idx, V)[:, 0])
    assert torch.equal(sample(logits, noise, cfg), old)
    probs = probs_from_logits(logits, cfg)
    before = probs.clone()
    assert torch.equal(gumbel_max(probs, noise), old)
    assert torch.equal(probs, before)                  # the caller's probabilities are untouched


def test_gumbel_at_smollm2_vocabulary_equals_the_int64_hash():
    index = torch.tensor([[0, 5], [2**32 + 1, 64]])
    new, old = NoiseStream([11, 2**63]).gumbel(index, 49152), gumbel64([11, 2**63], index, 49152)
    assert torch.equal(new.view(torch.int32), old.view(torch.int32))


def test_gumbel_max_with_zero_probabilities_equals_the_old_computation():
    """Zero and subnormal probabilities (filtered tokens, a -inf padded draft vocabulary, very
    peaked distributions) are raised to the smallest normal float: the argmax is unchanged."""
    g = torch.Generator().manual_seed(1)
    V, n = 3000, 256
    logits = torch.randn(n, V, generator=g) * torch.linspace(1, 60, n)[:, None]   # up to peaked
    logits[: n // 4, 500:] = float("-inf")                                          # padded
    probs = probs_from_logits(logits, SamplingConfig(temperature=0.7))
    probs[n // 2: n // 2 + 8, :40] = 1e-40                                          # subnormal
    assert (probs == 0).any(-1).float().mean() > 0.3
    for seeds in (range(n), range(n, 2 * n)):
        noise = gumbel64(seeds, torch.arange(n)[:, None], V)[:, 0]
        assert torch.equal(gumbel_max(probs, noise), gumbel_max_old(probs, noise))
    extreme = torch.full((n, V), 17.33)              # the largest float32 Gumbel value
    extreme[:, 0] = -2.86                            # the smallest, on a likely token
    assert torch.equal(gumbel_max(probs, extreme), gumbel_max_old(probs, extreme))


# -- generate_ar against the per-step loop with the int64 noise (the oracle) ----------------------

PROMPTS = [[5, 17, 200], [1, 2, 3, 4, 5, 6, 7], [250, 9, 9, 31, 64]]


@torch.inference_mode()
def old_ar(model, prompts, n, cfg, seeds, penalty=0.0):
    """The AR loop as it was: token j of row b sampled with noise index j drawn at step j."""
    B, V = len(prompts), model.config.vocab_size
    cache = KVCache.for_model(model, B, max_len=max(map(len, prompts)) + n)
    pre = prefill(model, cache, prompts)
    logits, pos = pre.logits, pre.next_pos
    counts = torch.zeros(B, V)
    out = []
    for j in range(n):
        logits = logits.float() - penalty * counts if penalty else logits
        index = torch.full((B, 1), j, dtype=torch.long)
        noise = (gumbel64(seeds, index, V) if cfg.coupling == "gumbel"
                 else uniforms64(seeds, index))[:, 0]
        tok = sample(logits, noise, cfg)
        counts.scatter_add_(1, tok[:, None], torch.ones(B, 1))
        out.append(tok)
        logits = model(tok[:, None], input_pos=pos[:, None], cache=cache)[:, -1]
        pos = pos + 1
    return torch.stack(out, 1).tolist()


AR_CONFIGS = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=0.0, coupling="gumbel"),
              SamplingConfig(), SamplingConfig(coupling="gumbel"),
              SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.4, coupling="gumbel"),
              SamplingConfig(temperature=0.9, top_p=0.8),
              SamplingConfig(temperature=0.9, top_p=0.8, coupling="gumbel"),
              SamplingConfig(top_k=20, cdf_order="sorted")]


@pytest.mark.parametrize("cfg", AR_CONFIGS)
@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_generate_ar_equals_the_old_loop(make_model, cfg, penalty):
    model = make_model(seed=3)
    seeds = [21, 22, 23]
    ref = old_ar(model, PROMPTS, 14, cfg, seeds, penalty)
    res = generate_ar(model, PROMPTS, 14, sampling=cfg, seed=21, stop_at_eos=False,
                      frequency_penalty=penalty)
    assert res.tokens == ref
    assert res.forward_passes == 14


@pytest.mark.parametrize("cfg", AR_CONFIGS[2:6])
@pytest.mark.parametrize("stream", [False, True])
def test_generate_ar_stops_at_eos_as_the_old_loop(make_model, cfg, stream):
    """Rows end at their first EOS, streamed or not, and decoding stops when every row has (the
    pass count the old loop gave: the step of the last row's EOS)."""
    model = make_model(seed=3)
    seeds = [21, 22, 23]
    ref = old_ar(model, PROMPTS, 14, cfg, seeds)
    # EOS: a token every row emits, the one whose last first-occurrence comes earliest
    common = set(ref[0]) & set(ref[1]) & set(ref[2])
    firsts = {t: max(r.index(t) for r in ref) for t in common}
    eos = min(firsts, key=firsts.get) if firsts else ref[0][3]
    got: list[list[int]] = [[] for _ in PROMPTS]

    def on_tokens(new):
        for r, t in zip(got, new, strict=True):
            r.extend(t)

    res = generate_ar(model, PROMPTS, 14, sampling=cfg, seed=21, eos_id=eos,
                      on_tokens=on_tokens if stream else None)
    want, finished = cut_at_eos(ref, eos)
    assert res.tokens == want and res.finished == finished
    assert res.forward_passes == max(map(len, want))
    if stream:
        assert got == want
