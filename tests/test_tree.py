"""Draft trees in lossless mode (core/tree.py): one teacher pass verifies several candidate
chains; the output stays seeded AR sampling (bit for bit in bf16 where the matmuls are
batch-invariant), and a tree that holds the teacher's chain anywhere accepts all of it."""

from __future__ import annotations

import pytest
import torch
from test_exact_verify import bf16_invariant
from test_feedback import RAGGED, OracleFeedback, ar_reference, tiny_student, tiny_teacher

from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.core.tree import DraftTree, parse_widths
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.feedback import generate_feedback
from kforcing.decoding.generate import generate
from kforcing.errors import KForcingError


class OracleTree(OracleFeedback):
    """Puts the teacher's own chain (OracleFeedback's proposal) in the tree as the last child of
    each node on it (so the walk must find it past the first candidates); other children are
    arbitrary distinct ids."""

    def propose_tree(self, window, tree):
        chain = list(self.propose(window).unbind(1))
        V, B = self.vocab_size, window.first.shape[0]
        nodes = [window.first]
        on_path = [torch.ones(B, dtype=torch.bool)]
        for d, w in enumerate(tree.widths, start=1):
            for p in tree.level(d - 1):
                true = chain[d - 1]
                for c in range(w):
                    last = c == w - 1
                    tok = torch.where(on_path[p] & torch.tensor(last), true,
                                      (true + 1 + c) % V)
                    nodes.append(tok)
                    on_path.append(on_path[p] & torch.tensor(last))
        return torch.stack(nodes[1:], 1)


def test_layout_of_a_small_tree():
    t = DraftTree((2, 1))
    assert t.size == 5 and t.levels == 3
    assert t.parent == (-1, 0, 0, 1, 2) and t.depth == (0, 1, 1, 2, 2)
    assert list(t.level(1)) == [1, 2] and list(t.level(2)) == [3, 4]
    assert t.paths.tolist() == [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3], [0, 2, 4]]
    anc = t.ancestors
    assert anc[3].tolist() == [True, True, False, True, False]
    assert anc.diagonal().all() and not anc.triu(1).any()
    assert DraftTree((1, 1, 1)).is_chain and not t.is_chain


def test_accept_walks_the_confirmed_path():
    t = DraftTree((2, 2))       # nodes: 0 | 1 2 | 3 4 (under 1) 5 6 (under 2)
    tokens = torch.tensor([[9, 4, 5, 6, 7, 8, 1]])

    def walk(after: dict[int, int]):
        asked = []

        def teacher(d, node):
            asked.append(int(node[0]))
            return torch.tensor([after.get(int(node[0]), 0)])
        best, path_after = t.accept(tokens, teacher)
        return int(best[0]), path_after[0].tolist(), asked

    # the teacher says 5 after the root (node 2), then 1 after node 2 (node 6), then 3
    assert walk({0: 5, 2: 1, 6: 3}) == (6, [5, 1, 3], [0, 2, 6])
    assert walk({0: 5, 2: 3}) == (2, [5, 3, 3], [0, 2])     # nothing under node 2 matches
    assert walk({0: 0}) == (0, [0, 0, 0], [0])            # no child of the root matches


def test_widths_are_checked():
    assert parse_widths("4,2,1", 4) == (4, 2, 1)
    assert parse_widths(None, 3) == (1, 1)
    for bad, k in (("4,2", 4), ("a,b", 3), ("", 1)):
        if bad:
            with pytest.raises(KForcingError):
                parse_widths(bad, k)
    with pytest.raises(KForcingError, match="positive"):
        DraftTree((2, 0))
    with pytest.raises(KForcingError, match="nodes"):
        DraftTree((8, 8, 8))


@pytest.mark.parametrize("widths", [(2, 1, 1), (3, 2, 1), (2, 2, 2)])
@pytest.mark.parametrize("sampling", [SamplingConfig(coupling="gumbel"),
                                      SamplingConfig(temperature=0.7, coupling="gumbel",
                                                     top_k=6),
                                      SamplingConfig(temperature=0.0)],
                         ids=["tau1", "tau0.7-topk", "greedy"])
def test_tree_lossless_equals_seeded_ar(widths, sampling):
    teacher = tiny_teacher()
    student = tiny_student(teacher, draft_vocab_size=8)
    noise = NoiseStream([11, 5, 7, 11, 3])
    res = generate_feedback(student, RAGGED, 13, k=4, mode="lossless", sampling=sampling,
                            noise=noise, tree=widths)
    assert res.tokens == ar_reference(teacher, RAGGED, 13, sampling, noise)
    assert res.extra["tree"] == list(widths)
    assert 1.0 <= res.extra["tokens_per_pass"] <= 4


def test_tree_with_eos_finishes_rows():
    teacher = tiny_teacher(vocab=6, eos=3)
    student = tiny_student(teacher)
    noise = NoiseStream.from_seed(4, len(RAGGED))
    s = SamplingConfig(coupling="gumbel")
    res = generate_feedback(student, RAGGED, 20, k=3, mode="lossless", sampling=s, noise=noise,
                            tree=(3, 2))
    ref = ar_reference(teacher, RAGGED, 20, s, noise, eos=3)
    assert res.tokens == ref
    assert res.finished == [r[-1] == 3 for r in ref]


@pytest.mark.parametrize("widths", [(2, 1, 1), (3, 3, 2)])
def test_the_teachers_chain_anywhere_in_the_tree_is_accepted_whole(widths):
    teacher = tiny_teacher(vocab=40)
    oracle = tiny_student(teacher, cls=OracleTree)
    s = SamplingConfig(coupling="gumbel")
    res = generate_feedback(oracle, [[1, 2, 3]], 40, k=4, mode="lossless", sampling=s, seed=2,
                            tree=widths)
    ar = generate_ar(teacher, [[1, 2, 3]], 40, sampling=s, seed=2)
    assert res.tokens == ar.tokens
    assert res.extra["tokens_per_pass"] == 4.0


@torch.inference_mode()
def test_tree_pass_gives_each_node_the_logits_of_its_path():
    """fp32, masked and per query: node i's logits equal AR steps along root -> i."""
    model = tiny_teacher(vocab=40)
    tree = DraftTree((3, 2))
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    nodes = torch.tensor([[7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    depth = torch.tensor(tree.depth)
    for per_query in (False, True):
        cache = KVCache.for_model(model, 1, max_len=32)
        model(prompt, cache=cache)
        out = model(nodes, input_pos=5 + depth[None], cache=cache, tree=tree,
                    per_query=per_query)
        assert cache.length == 5                                      # nothing committed
        for i in range(tree.size):
            path = tree.paths[i, :tree.depth[i] + 1]
            ref = KVCache.for_model(model, 1, max_len=32)
            model(prompt, cache=ref)
            want = model(nodes[:, path], cache=ref)[:, -1]
            torch.testing.assert_close(out[:, i], want, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_tree_lanes_follow_the_cache_bit_for_bit():
    """bf16 at batch 1, per query: each node's logits are the bits of AR steps along its path,
    through the lanes (KVCache.lane_buffers), also after the cache is rolled back, refilled with
    other tokens and grown past what the lanes last copied."""
    model = tiny_teacher(vocab=40)
    if not bf16_invariant(model):
        pytest.skip("this CPU's bf16 matmul is not batch-invariant")
    model = model.to(torch.bfloat16)
    tree = DraftTree((3, 2, 1))
    depth = torch.tensor(tree.depth)
    g = torch.Generator().manual_seed(0)
    cache = KVCache.for_model(model, 1, max_len=64)
    history = [1, 2, 3, 4, 5]
    model(torch.tensor([history]), cache=cache)
    for rollback, extra in ((0, [6, 7]), (3, [9]), (1, [])):
        nodes = torch.randint(0, 40, (1, tree.size), generator=g)
        L = cache.length
        out = model(nodes, input_pos=L + depth[None], cache=cache, tree=tree, per_query=True)
        assert len(cache._lanes) == model.config.n_layer
        assert cache._lanes[0][0].shape[1] == tree.leaves == 6          # (B, lanes, ...)
        for i in range(tree.size):
            ref = KVCache.for_model(model, 1, max_len=64)
            model(torch.tensor([history]), cache=ref)
            for tok in nodes[0, tree.paths[i, :tree.depth[i] + 1]].tolist():
                want = model(torch.tensor([[tok]]), cache=ref)[:, -1]
            assert torch.equal(out[:, i], want)
        # move the cache on: roll back, then write other tokens where the lanes had copied
        cache.truncate(L - rollback)
        del history[len(history) - rollback:]
        model(torch.tensor([extra + [11]]), cache=cache)
        history += extra + [11]


@torch.inference_mode()
def test_per_query_tree_pass_with_several_padded_rows():
    """Lanes hold each row's own prefix: two rows, one left-padded, per query equal masked."""
    model = tiny_teacher(vocab=40)
    tree = DraftTree((3, 2))
    depth = torch.tensor(tree.depth)
    prompt = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    pos = torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
    nodes = torch.randint(0, 40, (2, tree.size), generator=torch.Generator().manual_seed(1))
    outs = []
    for per_query in (False, True):
        cache = KVCache.for_model(model, 2, max_len=32)
        cache.mark_padding(valid)
        model(prompt, input_pos=pos, cache=cache)
        outs.append(model(nodes, input_pos=pos[:, -1:] + 1 + depth[None], cache=cache,
                          tree=tree, per_query=per_query))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_tree_lanes_layout():
    tree = DraftTree((2, 3, 1))
    assert tree.leaves == 6
    paths = tree.leaf_paths("cpu")
    assert paths.shape == (6, 4)
    # the leaves below node j of a level with n nodes are lanes [j * 6 / n, (j + 1) * 6 / n)
    for d in range(tree.levels):
        ids = tree.level(d)
        span = tree.leaves // len(ids)
        for j, node in enumerate(ids):
            assert (paths[j * span:(j + 1) * span, d] == node).all()


def test_bf16_tree_lossless_at_batch_1_is_bf16_ar_bit_for_bit():
    teacher = tiny_teacher(vocab=40)
    if not bf16_invariant(teacher):
        pytest.skip("this CPU's bf16 matmul is not batch-invariant")
    student = tiny_student(teacher).to(torch.bfloat16)
    s = SamplingConfig(coupling="gumbel")
    for seed, prompt in enumerate([[1, 2, 3], [5], [9, 8, 7, 6, 5, 4]]):
        ar = generate_ar(teacher, [prompt], 48, sampling=s, seed=seed, stop_at_eos=False)
        for widths in ((2, 1, 1), (4, 2, 1)):
            ll = generate_feedback(student, [prompt], 48, k=4, mode="lossless", sampling=s,
                                   seed=seed, stop_at_eos=False, tree=widths)
            assert ll.tokens == ar.tokens


def test_tree_errors_are_clear():
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    with pytest.raises(KForcingError, match="lossless"):
        generate(student, [[1, 2]], 4, mode="kforcing", k=4, tree="2,1,1")
    with pytest.raises(KForcingError, match="auto"):
        generate(student, [[1, 2]], 4, mode="lossless", k="auto", tree="2,1,1")
    with pytest.raises(KForcingError, match="3 widths"):
        generate(student, [[1, 2]], 4, mode="lossless", k=4, tree="2,1")
    with pytest.raises(KForcingError, match="Gumbel"):
        generate(student, [[1, 2]], 4, mode="lossless", k=4, tree="2,1,1",
                 sampling=SamplingConfig(coupling="inverse-cdf"))
    with pytest.raises(KForcingError, match="lossless"):
        generate(teacher, [[1, 2]], 4, tree="2,1,1")
    small = tiny_student(teacher, draft_vocab_size=4)
    with pytest.raises(KForcingError, match="vocabulary of 4"):
        generate(small, [[1, 2]], 4, mode="lossless", k=3, tree="5,1")
    # all-ones widths are the chain itself
    a = generate(student, [[1, 2]], 9, mode="lossless", k=4, tree="1,1,1", seed=3)
    b = generate(student, [[1, 2]], 9, mode="lossless", k=4, seed=3)
    assert a.tokens == b.tokens and a.extra["tree"] is None
