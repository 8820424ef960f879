"""Per-query verification (Transformer.forward(per_query=True)): a k-token pass over a KV cache
computes what k one-token steps compute. In fp32 that holds up to rounding. In bf16, on a CPU
whose matmul kernels give a row the same bits whatever the number of rows (decoding.feedback.
batch_invariant, probed first; the tests skip where it is False), it holds bit for bit, and then
lossless decoding with a feedback student reproduces bf16 AR sampling exactly at batch 1."""

from __future__ import annotations

import copy

import pytest
import torch
from test_feedback import OracleFeedback, tiny_student, tiny_teacher

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import batch_invariant, generate_feedback
from kforcing.students.feedback import FeedbackStudent


def bf16_invariant(model) -> bool:
    return batch_invariant(copy.deepcopy(model).to(torch.bfloat16), 8)


@torch.inference_mode()
def steps_vs_window(model, prompts: list[list[int]], new: list[list[int]], dtype: torch.dtype):
    """Logits and caches of len(new[0]) one-token steps, and of one per-query pass over the same
    tokens, after the same (left-padded) prefill."""
    model = model.to(dtype)
    B, P, T = len(prompts), max(map(len, prompts)), len(new[0])
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    pos = (torch.arange(P)[None] - (~valid).sum(1, keepdim=True)).clamp(min=0)
    caches, outs = [], []
    for _ in range(2):
        c = KVCache.for_model(model, B, max_len=P + T + 3)
        c.mark_padding(valid)
        model(ids, input_pos=pos, cache=c)
        caches.append(c)
    z = torch.tensor(new)
    zpos = pos[:, -1:] + 1 + torch.arange(T)
    outs.append(torch.cat([model(z[:, i:i + 1], input_pos=zpos[:, i:i + 1], cache=caches[0])
                           for i in range(T)], 1))
    outs.append(model(z, input_pos=zpos, cache=caches[1], per_query=True))
    return outs, caches


@pytest.mark.parametrize("prompts", [[[1, 2, 3, 4, 5]], [[1, 2], [3, 4, 5, 6, 7]]],
                         ids=["one-row", "ragged"])
def test_per_query_pass_equals_single_steps_fp32(prompts):
    model = tiny_teacher(vocab=40)
    new = [[7, 8, 9, 10]] * len(prompts)
    (steps, window), (c1, c2) = steps_vs_window(model, prompts, new, torch.float32)
    torch.testing.assert_close(window, steps, rtol=0, atol=1e-5)
    n = c1.length
    for a, b in zip(c2.k + c2.v, c1.k + c1.v, strict=True):
        torch.testing.assert_close(a[:, :, :n], b[:, :, :n], rtol=0, atol=1e-5)
    assert c1.length == c2.length


@pytest.mark.parametrize("prompts", [[[1, 2, 3, 4, 5]], [[1, 2], [3, 4, 5, 6, 7]]],
                         ids=["one-row", "ragged"])
def test_per_query_pass_is_single_steps_bit_for_bit_in_bf16(prompts):
    model = tiny_teacher(vocab=40)
    if not bf16_invariant(model):
        pytest.skip("this CPU's bf16 matmul is not batch-invariant")
    new = [[7, 8, 9, 10]] * len(prompts)
    (steps, window), (c1, c2) = steps_vs_window(model, prompts, new, torch.bfloat16)
    assert torch.equal(window, steps)
    assert c1.length == c2.length
    for a, b in zip(c1.k + c1.v, c2.k + c2.v, strict=True):
        assert torch.equal(a[:, :, :c1.length], b[:, :, :c2.length])


@pytest.mark.parametrize("oracle", [False, True], ids=["random-draft", "perfect-draft"])
def test_bf16_lossless_at_batch_1_is_bf16_ar(oracle):
    """Over long answers a single differing bit would flip some Gumbel argmax sooner or later:
    the tokens are equal because the logits are."""
    teacher = tiny_teacher(vocab=40)
    if not bf16_invariant(teacher):
        pytest.skip("this CPU's bf16 matmul is not batch-invariant")
    student = tiny_student(teacher, cls=OracleFeedback if oracle else FeedbackStudent
                           ).to(torch.bfloat16)
    s = SamplingConfig(coupling="gumbel")
    for seed, prompt in enumerate([[1, 2, 3], [5], [9, 8, 7, 6, 5, 4]]):
        ar = generate_ar(teacher, [prompt], 48, sampling=s, seed=seed, stop_at_eos=False)
        ll = generate_feedback(student, [prompt], 48, k=4, mode="lossless", sampling=s,
                               noise=NoiseStream.from_seed(seed, 1), stop_at_eos=False)
        assert ll.tokens == ar.tokens
        assert ll.extra["tokens_per_pass"] == 4.0 if oracle else ll.extra["tokens_per_pass"] >= 1
