"""The K-Forcing student: staircase masks, training pass == KV-cache decode pass, the two-level
staircase, the cache protocol for noise tokens, the teacher-preserving layout, and argument checks.
"""

from __future__ import annotations

import pytest
import torch

from kforcing.core.kv_cache import KVCache
from kforcing.core.masks import staircase
from kforcing.core.sampling import SamplingConfig, inverse_cdf
from kforcing.decoding.ar import generate_ar
from kforcing.decoding.kforcing import generate_kforcing
from kforcing.errors import KForcingError
from kforcing.students.pushforward import PushForward, StudentConfig, check_k, check_tau

LAYOUTS = ("shared", "teacher-preserving")
HEADS = ("argmax", "inverse-cdf")
B, N = 2, 7
TAU = torch.tensor([1.0, 0.7], dtype=torch.float64)


def make_student(
    make_model, layout="shared", head="argmax", max_k=4, seed=0, perturb=True, cdf_order="vocab"
) -> PushForward:
    """A tiny student; with perturb, its backbone's weights are moved away from the teacher's."""
    teacher = make_model(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + seed)
        student = PushForward(
            teacher, StudentConfig(max_k=max_k, layout=layout, head=head, cdf_order=cdf_order)
        )
        if perturb:
            with torch.no_grad():
                for p in student.backbone.parameters():
                    p.add_(0.02 * torch.randn_like(p))
    return student.eval()


def rand_u(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64)


def rand_x(seed=0, n=N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, n), generator=g)


def fresh_cache(student: PushForward, max_len=64) -> KVCache:
    return KVCache.for_model(student.context_model, B, max_len=max_len)


def positions(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).expand(B, n)


# -- masks -------------------------------------------------------------------------------------


def test_staircase_hand_checked_all_anchors():
    st = staircase(3, 2)
    expected = [
        # c0 c1 c2 | W0    | W1    | W2
        [1, 0, 0, 0, 0, 0, 0, 0, 0],  # c0
        [1, 1, 0, 0, 0, 0, 0, 0, 0],  # c1
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # c2
        [1, 0, 0, 1, 0, 0, 0, 0, 0],  # W0 slot 0 (anchor 0)
        [1, 0, 0, 1, 1, 0, 0, 0, 0],  # W0 slot 1
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # W1 slot 0 (anchor 1)
        [1, 1, 0, 0, 0, 1, 1, 0, 0],  # W1 slot 1
        [1, 1, 1, 0, 0, 0, 0, 1, 0],  # W2 slot 0 (anchor 2)
        [1, 1, 1, 0, 0, 0, 0, 1, 1],  # W2 slot 1
    ]
    assert st.mask.dtype == torch.bool
    assert torch.equal(st.mask, torch.tensor(expected, dtype=torch.bool))
    assert st.positions.tolist() == [0, 1, 2, 1, 2, 2, 3, 3, 4]
    assert (st.n_context, st.window) == (3, 2)
    assert bool(st.mask.any(1).all())


def test_staircase_hand_checked_anchor_subset():
    st = staircase(3, 2, torch.tensor([0, 2]))
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0],  # window of anchor 0
        [1, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],  # window of anchor 2
        [1, 1, 1, 0, 0, 1, 1],
    ]
    assert torch.equal(st.mask, torch.tensor(expected, dtype=torch.bool))
    assert st.positions.tolist() == [0, 1, 2, 1, 2, 3, 4]
    assert bool(st.mask.any(1).all())


@pytest.mark.parametrize(
    "n, w, anchors", [(1, 1, None), (5, 3, None), (6, 4, [1, 3, 5]), (4, 1, [3])]
)
def test_staircase_every_row_attends_somewhere(n, w, anchors):
    a = None if anchors is None else torch.tensor(anchors)
    st = staircase(n, w, a)
    m = n if anchors is None else len(anchors)
    assert st.mask.shape == (n + m * w, n + m * w)
    assert st.positions.shape == (n + m * w,)
    assert bool(st.mask.any(1).all())
    assert bool(st.mask.diagonal().all())


def test_staircase_window_zero_is_the_causal_mask():
    st = staircase(3, 0)
    assert torch.equal(st.mask, torch.ones(3, 3, dtype=torch.bool).tril())
    assert st.positions.tolist() == [0, 1, 2]


# -- training staircase == KV-cache decoding ---------------------------------------------------


def _check_staircase_matches_window_pass(student, x, k, anchors):
    M = N if anchors is None else anchors.numel()
    u = rand_u(B, M, k, seed=1)
    with torch.no_grad():
        out = student.staircase_forward(x, u, TAU, anchors)
        assert out.tokens.shape == (B, M, k)
        assert out.logits.shape == (B, M, k, student.model_config.vocab_size)
        ts = range(N) if anchors is None else anchors.tolist()
        for m, t in enumerate(ts):
            cache = fresh_cache(student)
            w = student.window_pass(cache, x[:, : t + 1], positions(0, t + 1), u[:, m], TAU)
            assert w.tokens.shape == (B, 1, k)
            assert cache.length == t + 1
            diff = (w.logits[:, 0] - out.logits[:, m]).abs().max().item()
            assert diff < 1e-5, (t, diff)
            assert torch.equal(w.tokens[:, 0], out.tokens[:, m]), t


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head", HEADS)
def test_staircase_forward_equals_window_pass(make_model, layout, head):
    student = make_student(make_model, layout, head)
    x = rand_x()
    _check_staircase_matches_window_pass(student, x, 3, None)
    _check_staircase_matches_window_pass(student, x, 3, torch.tensor([0, 2, 6]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_staircase_forward_equals_window_pass_k1_argmax(make_model, layout):
    student = make_student(make_model, layout, "argmax")
    _check_staircase_matches_window_pass(student, rand_x(seed=3), 1, torch.tensor([1, 4]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_staircase_forward_inverse_cdf_k1(make_model, layout):
    student = make_student(make_model, layout, "inverse-cdf")
    _check_staircase_matches_window_pass(student, rand_x(seed=3), 1, torch.tensor([1, 4]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_perturbed_student_differs_from_teacher(make_model, layout):
    """Guards the tests above: the perturbation really changes the student's backbone."""
    student = make_student(make_model, layout, "argmax")
    teacher = make_model(seed=0)
    x = rand_x()
    with torch.no_grad():
        assert not torch.equal(student.backbone(x), teacher(x))
        if layout == "teacher-preserving":
            assert torch.equal(student.context_model(x), teacher(x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_level_staircase_equals_two_cached_passes(make_model, layout):
    kp = 2
    student = make_student(make_model, layout, "argmax", seed=1)
    x = rand_x(seed=5)
    anchors = torch.tensor([0, 3, 6])
    M = anchors.numel()
    u1, u2 = rand_u(B, M, kp, seed=2), rand_u(B, M, kp, seed=3)
    with torch.no_grad():
        y1 = student.staircase_forward(x, u1, TAU, anchors).tokens
        out = student.staircase_forward(x, u2, TAU, anchors, known=y1)
        assert out.tokens.shape == (B, M, kp)
        for m, t in enumerate(anchors.tolist()):
            cache = fresh_cache(student)
            first = student.window_pass(cache, x[:, : t + 1], positions(0, t + 1), u1[:, m], TAU)
            assert torch.equal(first.tokens[:, 0], y1[:, m])
            second = student.window_pass(
                cache, first.tokens[:, 0], positions(t + 1, kp), u2[:, m], TAU
            )
            assert cache.length == t + 1 + kp
            diff = (second.logits[:, 0] - out.logits[:, m]).abs().max().item()
            assert diff < 1e-5, (t, diff)
            assert torch.equal(second.tokens[:, 0], out.tokens[:, m])


# -- the cache protocol ------------------------------------------------------------------------


def _assert_cache_equal(a: KVCache, b: KVCache) -> None:
    assert a.length == b.length
    L = a.length
    assert all(torch.equal(x[:, :, :L], y[:, :, :L]) for x, y in zip(a.k + a.v, b.k + b.v,
                                                                         strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head", HEADS)
def test_noise_tokens_never_enter_the_cache(make_model, layout, head):
    """After each pass the cache holds exactly the real tokens' K/V: its length grows by the
    number of real tokens, and the slots are bit-identical whatever the noise was.

    Against a pass that feeds only the real tokens: bit-identical for the teacher-preserving
    layout (the teacher stream never sees a noise token); for the shared layout the real tokens
    share one forward with the noise tokens, and SDPA with T = R + n queries instead of R rounds
    differently in the last bit (the noise *values* are irrelevant, checked bit-exactly)."""
    k = 3
    student = make_student(make_model, layout, head)
    ctx = student.context_model
    x = rand_x(seed=7)
    prompt, nxt = x[:, :5], x[:, 5:7]
    caches = [fresh_cache(student) for _ in range(2)]
    ref = fresh_cache(student)
    with torch.no_grad():
        # pass 1: the prompt; pass 2: two real tokens (any number of real tokens works)
        for real, pos in ((prompt, positions(0, 5)), (nxt, positions(5, 2))):
            before = caches[0].length
            for seed, cache in enumerate(caches):
                student.window_pass(cache, real, pos, rand_u(B, k, seed=seed), TAU)
                assert cache.length == before + real.shape[1]
            _assert_cache_equal(caches[0], caches[1])
            ctx(real, input_pos=pos, cache=ref)
            if layout == "teacher-preserving":
                _assert_cache_equal(caches[0], ref)
            else:
                assert caches[0].length == ref.length
                L = ref.length
                for got, want in zip(caches[0].k + caches[0].v, ref.k + ref.v, strict=True):
                    torch.testing.assert_close(got[:, :, :L], want[:, :, :L])


# -- the teacher-preserving layout -------------------------------------------------------------


@pytest.mark.parametrize("cdf_order", ["vocab", "sorted"])
def test_teacher_preserving_cache_and_first_token_are_the_teachers(make_model, cdf_order):
    k = 3
    student = make_student(make_model, "teacher-preserving", "inverse-cdf", cdf_order=cdf_order)
    teacher = make_model(seed=0)
    cache, tcache = fresh_cache(student), fresh_cache(student)
    real, pos = rand_x(seed=8)[:, :4], positions(0, 4)
    with torch.no_grad():
        for step in range(4):
            u = rand_u(B, k, seed=step)
            out = student.window_pass(cache, real, pos, u, TAU)
            t_logits = teacher(real, input_pos=pos, cache=tcache, last_only=True)[:, -1]
            _assert_cache_equal(cache, tcache)
            assert torch.equal(out.logits[:, 0, 0], t_logits)
            probs = (t_logits.float() / TAU[:, None].float()).softmax(-1)
            assert torch.equal(out.tokens[:, 0, 0], inverse_cdf(probs, u[:, 0], cdf_order))
            real, pos = out.tokens[:, 0], pos[:, -1:] + torch.arange(1, k + 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_has_no_teacher_keys(make_model, layout):
    student = make_student(make_model, layout, "argmax")
    keys = list(student.state_dict())
    assert keys and not any(key.startswith("teacher.") for key in keys)
    assert any(key.startswith("backbone.") for key in keys)
    assert any(key.startswith("noise.") for key in keys)
    # the frozen teacher has no trainable parameters and is not among the student's
    params = {id(p) for p in student.parameters()}
    if layout == "teacher-preserving":
        assert not any(p.requires_grad for p in student.teacher.parameters())
        assert not any(id(p) in params for p in student.teacher.parameters())
    else:
        assert student.teacher is None


@pytest.mark.parametrize("cdf_order", ["vocab", "sorted"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_perfect_map_k1_reproduces_ar_sampling(make_model, cdf_order, tau):
    """teacher-preserving + inverse-cdf + k=1: each pass draws InvCDF(p_teacher, u) from one
    uniform per row, exactly as the AR sampler does; same seed, same tokens."""
    student = make_student(
        make_model, "teacher-preserving", "inverse-cdf", max_k=2, cdf_order=cdf_order
    )
    teacher = make_model(seed=0)
    prompts = [[5, 17, 200], [1, 2, 3, 4, 5, 6, 7]]
    kf = generate_kforcing(student, prompts, 12, k=1, temperature=tau, seed=11)
    ar = generate_ar(
        teacher, prompts, 12, sampling=SamplingConfig(temperature=tau, cdf_order=cdf_order), seed=11
    )
    assert kf.tokens == ar.tokens
    assert kf.forward_passes == ar.forward_passes == 12


# -- argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("k, max_k", [(5, 4), (0, 4), (-1, 4), (2, 1), (1.0, 4)])
def test_check_k_rejects(k, max_k):
    with pytest.raises(KForcingError) as e:
        check_k(k, max_k)
    assert "\n" not in str(e.value) and str(e.value)


def test_check_k_accepts():
    for k in range(1, 5):
        check_k(k, 4)


@pytest.mark.parametrize(
    "tau",
    [0.0, -1.0, torch.tensor([1.0, 0.0]), torch.tensor([-0.5], dtype=torch.float64),
     float("nan"), float("inf"), torch.tensor([1.0, float("nan")]),
     torch.tensor([float("inf")], dtype=torch.float64)],
)
def test_check_tau_rejects(tau):
    with pytest.raises(KForcingError) as e:
        check_tau(tau)
    assert "\n" not in str(e.value) and str(e.value)


def test_check_tau_accepts():
    check_tau(1e-3)
    check_tau(torch.tensor([0.5, 2.0], dtype=torch.float64))


def test_staircase_forward_checks_k_and_tau(make_model):
    student = make_student(make_model, max_k=2, perturb=False)
    x = rand_x()
    with pytest.raises(KForcingError, match="max_k=2"):
        student.staircase_forward(x, rand_u(B, N, 3), TAU)
    with pytest.raises(KForcingError, match="tau"):
        student.staircase_forward(x, rand_u(B, N, 2), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"layout": "bad"}, "layout"),
        ({"head": "bad"}, "head"),
        ({"cdf_order": "bad"}, "cdf_order"),
        ({"max_k": 0}, "max_k"),
    ],
)
def test_student_config_rejects(kw, msg):
    with pytest.raises(KForcingError, match=msg) as e:
        StudentConfig(**kw)
    assert "\n" not in str(e.value)


def test_n_noise_per_head():
    assert StudentConfig(head="argmax").n_noise(3) == 3
    assert StudentConfig(head="inverse-cdf").n_noise(3) == 2


@pytest.mark.parametrize("move, dtype", [
    (lambda m: m.half(), torch.float16),
    (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.double(), torch.float64),
    (lambda m: m.to(torch.float64), torch.float64),
    (lambda m: m.type(torch.float64), torch.float64),
])
def test_moving_a_student_moves_its_frozen_teacher(make_model, move, dtype):
    """The frozen teacher is no submodule, so `.half()`, `.bfloat16()`, `.cuda()` (every
    sibling of `.to()`) used to leave it behind in float32 / on the CPU."""
    student = make_student(make_model, layout="teacher-preserving", head="inverse-cdf")
    teacher = student.teacher
    assert move(student) is student
    assert student.teacher is teacher
    assert {p.dtype for p in teacher.parameters()} == {dtype}
    assert {p.dtype for p in student.parameters()} == {dtype}
    assert teacher.rope_cos.dtype == student.backbone.rope_cos.dtype
