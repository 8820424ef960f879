"""Inverse-CDF and Gumbel-max sampling: exact intervals, correct frequencies, filters and config
checks."""

from __future__ import annotations

import math

import pytest
import torch

from kforcing.core.sampling import (
    SamplingConfig,
    draw,
    inverse_cdf,
    probs_from_logits,
    sample,
)
from kforcing.errors import KForcingError

# exactly representable in binary, so CDF boundaries are exact too
P = torch.tensor([0.125, 0.0, 0.25, 0.5, 0.0, 0.125])
CDF = [0.125, 0.125, 0.375, 0.875, 0.875, 1.0]


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


@pytest.mark.parametrize("order", ["vocab", "sorted"])
def test_inverse_cdf_frequencies(order):
    n = 20000
    g = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1])
    u = torch.rand(n, generator=g, dtype=torch.float64)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    tokens = inverse_cdf(p.expand(n, -1), u, order)
    assert tokens.dtype == torch.long and tokens.shape == (n,)
    counts = torch.bincount(tokens, minlength=len(p)).double()
    freq = counts / n
    for i, pi in enumerate(p.tolist()):
        sigma = math.sqrt(pi * (1 - pi) / n)
        if pi == 0:
            assert counts[i] == 0
        else:
            assert abs(freq[i].item() - pi) < 5 * sigma, (i, freq[i].item(), pi)


def test_inverse_cdf_vocab_intervals_exact():
    # token i is chosen exactly for u in [CDF[i-1], CDF[i]); empty intervals never
    cases = [
        (0.0, 0),
        (below(0.125), 0),
        (0.125, 2),
        (below(0.375), 2),
        (0.375, 3),
        (below(0.875), 3),
        (0.875, 5),
        (below(1.0), 5),
    ]
    u = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    got = inverse_cdf(P.expand(len(cases), -1), u, "vocab")
    assert got.tolist() == [c[1] for c in cases]


def test_zero_probability_tokens_never_chosen():
    p = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0])
    us = torch.tensor([0.0, 1e-300, below(0.5), 0.5, below(1.0)], dtype=torch.float64)
    for order in ("vocab", "sorted"):
        got = inverse_cdf(p.expand(len(us), -1), us, order).tolist()
        assert set(got) <= {2, 4}, (order, got)
    assert inverse_cdf(p.expand(len(us), -1), us, "vocab").tolist() == [2, 2, 2, 4, 4]
    # a dense grid of u, for an unnormalised row with zeros everywhere around the support
    q = torch.tensor([0.0, 3.0, 0.0, 0.0, 1.0, 0.0])
    grid = torch.linspace(0, below(1.0), 1001, dtype=torch.float64)
    for order in ("vocab", "sorted"):
        got = set(inverse_cdf(q.expand(len(grid), -1), grid, order).tolist())
        assert got == {1, 4}


def test_inverse_cdf_unnormalised_scales_u():
    # u is scaled by the row total, so unnormalised weights act like probabilities
    w = P * 8
    u = torch.tensor([0.0, below(0.125), 0.125, 0.5, below(1.0)], dtype=torch.float64)
    assert inverse_cdf(w.expand(5, -1), u).tolist() == inverse_cdf(P.expand(5, -1), u).tolist()


def test_sorted_order_intervals_and_argmax():
    # sorted order: 3 (0.5), 2 (0.25), then 0 and 5 (0.125, tie broken by id), zeros last
    cases = [
        (0.0, 3),
        (1e-12, 3),
        (below(0.5), 3),
        (0.5, 2),
        (below(0.75), 2),
        (0.75, 0),
        (below(0.875), 0),
        (0.875, 5),
        (below(1.0), 5),
    ]
    u = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    got = inverse_cdf(P.expand(len(cases), -1), u, "sorted")
    assert got.tolist() == [c[1] for c in cases]


def test_sorted_small_u_picks_argmax_batched():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 3
    probs = logits.softmax(-1)
    u = torch.full((64,), 1e-9, dtype=torch.float64)
    assert torch.equal(inverse_cdf(probs, u, "sorted"), probs.argmax(-1))
    assert torch.equal(
        inverse_cdf(probs, torch.zeros(64, dtype=torch.float64), "sorted"), probs.argmax(-1)
    )


def test_inverse_cdf_bad_order():
    with pytest.raises(KForcingError, match="cdf order"):
        inverse_cdf(P, torch.tensor(0.5, dtype=torch.float64), "random")


def test_top_k_keeps_exactly_k():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 50, generator=g)
    for k in (1, 3, 10):
        probs = probs_from_logits(logits, SamplingConfig(top_k=k))
        assert ((probs > 0).sum(-1) == k).all()
        top = torch.topk(logits, k, dim=-1).indices
        kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
        assert torch.equal(probs > 0, kept)
        # renormalised softmax over the kept logits
        ref = logits.masked_fill(~kept, float("-inf")).softmax(-1)
        assert torch.allclose(probs, ref, atol=1e-6)
        assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-6)
    # k >= vocab disables the filter
    assert torch.allclose(probs_from_logits(logits, SamplingConfig(top_k=50)), logits.softmax(-1))
    assert torch.allclose(probs_from_logits(logits, SamplingConfig(top_k=99)), logits.softmax(-1))


@pytest.mark.parametrize(
    "top_p, n_kept", [(0.3, 1), (0.45, 1), (0.6, 2), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 5)]
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, n_kept):
    base = torch.tensor([0.15, 0.5, 0.02, 0.3, 0.03])  # sorted: 1, 3, 0, 4, 2
    order = [1, 3, 0, 4, 2]
    # cumulative in sorted order: 0.5, 0.8, 0.95, 0.98, 1.0 -> the top_p values above sit
    # well inside the intervals, away from float rounding
    logits = base.log()
    probs = probs_from_logits(logits, SamplingConfig(top_p=top_p))
    kept = sorted(order[:n_kept])
    assert (probs > 0).nonzero().flatten().tolist() == kept
    ref = torch.zeros(5)
    ref[kept] = base[kept] / base[kept].sum()
    assert torch.allclose(probs, ref, atol=1e-6)


def test_top_p_prefix_property_random():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(20, 40, generator=g) * 2
    for top_p in (0.1, 0.5, 0.9):
        probs = probs_from_logits(logits, SamplingConfig(top_p=top_p))
        full = logits.softmax(-1).double()
        for row in range(20):
            kept = probs[row] > 0
            n = int(kept.sum())
            sorted_p, idx = full[row].sort(descending=True)
            # the kept set is the n most likely tokens
            assert set(idx[:n].tolist()) == set(kept.nonzero().flatten().tolist())
            cum = sorted_p.cumsum(0)
            assert cum[n - 1] >= top_p - 1e-6  # reaches p...
            assert n == 1 or cum[n - 2] < top_p + 1e-6  # ...and is the smallest such prefix


def test_top_k_and_top_p_combined():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = probs_from_logits(logits, SamplingConfig(top_k=3, top_p=0.7))
    # top_k leaves {0,1,2} renormalised (0.526, 0.316, 0.158); top_p 0.7 then needs two
    assert (probs > 0).tolist() == [True, True, False, False]


def test_temperature_zero_is_greedy():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(8, 100, generator=g)
    cfg = SamplingConfig(temperature=0.0)
    assert cfg.greedy
    probs = probs_from_logits(logits, cfg)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 100).float())
    for u in (0.0, 0.3, below(1.0)):
        uu = torch.full((8,), u, dtype=torch.float64)
        assert torch.equal(sample(logits, uu, cfg), logits.argmax(-1))
        assert torch.equal(inverse_cdf(probs, uu), logits.argmax(-1))


def test_temperature_scales_logits():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(3, 30, generator=g)
    probs = probs_from_logits(logits, SamplingConfig(temperature=0.5))
    assert torch.allclose(probs, (logits / 0.5).softmax(-1), atol=1e-6)
    hot = probs_from_logits(logits, SamplingConfig(temperature=100.0))
    assert float(hot.max() - hot.min()) < 0.01


def _hand_sorted_cdf(logits: list[float], temperature: float, top_k: int, top_p: float
                     ) -> list[tuple[int, float, float]]:
    """(token, lo, hi) CDF intervals in decreasing-probability order (ties by id), written out
    in plain Python floats: softmax at the temperature, keep the top_k most likely, then the
    smallest prefix whose mass reaches top_p, renormalise."""
    scaled = [x / temperature for x in logits]
    m = max(scaled)
    weights = [math.exp(x - m) for x in scaled]
    order = sorted(range(len(logits)), key=lambda i: (-weights[i], i))
    kept = order[:top_k] if top_k else order
    total = sum(weights[i] for i in kept)
    prefix, mass = [], 0.0
    for i in kept:
        if mass >= top_p:
            break
        prefix.append(i)
        mass += weights[i] / total
    z = sum(weights[i] for i in prefix)
    intervals, lo = [], 0.0
    for i in prefix:
        hi = lo + weights[i] / z
        intervals.append((i, lo, hi))
        lo = hi
    return intervals


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 20, 0.9),
                                                       (1.3, 0, 0.5), (0.5, 5, 1.0)])
def test_sorted_sampling_picks_the_token_of_a_hand_computed_interval(temperature, top_k, top_p):
    """For u in the middle of token t's interval of the hand-computed sorted CDF, sample() with
    cdf_order 'sorted' returns t (every kept token, in every row)."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 40, generator=g) * 2
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, cdf_order="sorted")
    for row in range(logits.shape[0]):
        intervals = _hand_sorted_cdf(logits[row].tolist(), temperature, top_k, top_p)
        assert len(intervals) >= 1
        u = torch.tensor([(lo + hi) / 2 for _, lo, hi in intervals], dtype=torch.float64)
        got = sample(logits[row].expand(len(intervals), -1), u, cfg)
        assert got.tolist() == [t for t, _, _ in intervals], row


def test_gumbel_max_frequencies_and_argmax():
    """Gumbel-max is an exact sample of p (frequencies within 5 sigma) and, for p one-hot, the
    argmax whatever the noise."""
    n = 20000
    p = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1])
    g = torch.Generator().manual_seed(5)
    gumbel = -torch.log(-torch.log(torch.rand(n, len(p), generator=g).clamp(1e-12, 1 - 1e-7)))
    cfg = SamplingConfig(coupling="gumbel")
    tokens = draw(p.expand(n, -1), gumbel, cfg)
    freq = torch.bincount(tokens, minlength=len(p)).double() / n
    for i, pi in enumerate(p.tolist()):
        assert abs(float(freq[i]) - pi) <= 5 * math.sqrt(pi * (1 - pi) / n) + 1e-12, i
    one_hot = torch.zeros(len(p))
    one_hot[3] = 1.0
    assert (draw(one_hot.expand(n, -1), gumbel, cfg) == 3).all()


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"coupling": "argmax"}, "coupling"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"cdf_order": "random"}, "cdf_order"),
    ],
)
def test_bad_sampling_config(kwargs, msg):
    with pytest.raises(KForcingError, match=msg):
        SamplingConfig(**kwargs)
