"""Decoding with the token-feedback student (docs/METHOD.md section 9): K-Forcing mode (k tokens
per teacher pass) and fused lossless mode, plus the window-match measurement.

One loop serves both modes. A row holds `first`, its next token (an exact teacher sample, drawn
with its own noise from the teacher's logits), and the draft's feature for the step after it.
A window: the draft proposes y_2..y_k; one teacher pass reads [first, y_2..y_k] (they enter its
cache) and gives features and logits at each of them.

- kforcing: all k tokens are emitted; the teacher's logits at the last one give the next `first`.
  With decoding.feedback_window.compile_window a whole chain window (proposal, teacher pass,
  draw, re-read) is one compiled call; with only Transformer.compile_decode, its teacher pass.
- lossless: the teacher's own token at slot j (with the noise of that token index) verifies
  y_{j+2}; the longest agreeing prefix is emitted with `first`, and the teacher's token at the
  first disagreement (or after the last proposal) becomes the next `first`. Rejected slots are
  masked out of the cache. Every emitted token is the teacher's token under the same noise, so
  the output is token-identical to seeded AR sampling with the same sampler and NoiseStream.
  At batch 1, where the teacher's matmuls are batch-invariant (batch_invariant: bf16 on CPUs
  with AMX or AVX512-BF16), the verification pass also attends query by query (Transformer.
  forward's per_query) and rejected slots are rolled back rather than masked, so it repeats AR's
  arithmetic exactly: identical bit for bit, not only up to rounding.

Lossless mode can verify a draft tree instead of one chain (`tree`, core/tree.py): the draft
proposes k-1 levels of top-w candidates, one teacher pass reads every node (each attending to
its own path), and the confirmed path is emitted and committed as the chain's would be.

After each pass the draft re-reads the committed positions with the teacher's real features,
(feature at slot j, token after it), which both replaces its speculative entries and gives the
next window's first draft step (refeed=False keeps the speculative entries instead).

Rows are batched with left padding and per-row RoPE positions; every pass appends k slots to
every row, and slots that a row rejected (or that belong to a finished row) are masked out.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from kforcing.core.kv_cache import KVCache
from kforcing.core.model import CACHE_ROUND
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig, probs_from_logits, sample, token_noise
from kforcing.core.tree import DraftTree
from kforcing.decoding.common import (
    GenerationResult,
    OnTokens,
    Streamer,
    check_prompts,
    cut_at_eos,
    left_pad,
    noise_for,
    sync_fn,
)
from kforcing.decoding.feedback_window import window_pass
from kforcing.errors import KForcingError
from kforcing.students.feedback import FeedbackStudent, check_k

MODES = ("kforcing", "lossless")


class WindowNoise:
    """The noise of a window's k tokens (B rows), made when first asked for: slot i is the
    noise of the window's token i + 1 (y_1's draw is the previous window's). Under the Gumbel
    coupling a slot is a (B, V) vector; the draft asks only for its vocabulary's entries, and
    a lossless window whose rows all rejected at slot j never needs the later slots.
    WindowNoise.given wraps noise made beforehand, (B, k[, V])."""

    def __init__(self, stream: NoiseStream | None, index: torch.Tensor | None,
                 sampling: SamplingConfig, vocab_size: int, ready: torch.Tensor | None = None):
        self.stream, self.index, self.ready = stream, index, ready
        self.sampling, self.vocab_size = sampling, vocab_size
        self.slots: dict[int, torch.Tensor] = {}

    @classmethod
    def given(cls, noise: torch.Tensor, sampling: SamplingConfig) -> WindowNoise:
        return cls(None, None, sampling, noise.shape[-1] if noise.dim() == 3 else 0, noise)

    @property
    def k(self) -> int:
        return (self.ready if self.ready is not None else self.index).shape[1]

    def slot(self, i: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Slot i's noise (B,) or (B, V); with ids (N,) under the Gumbel coupling only those
        vocabulary entries, (B, N), the same bits as the whole vector's."""
        i = i % self.k
        vector = self.sampling.coupling == "gumbel" and not self.sampling.greedy
        if self.ready is not None:
            g = self.ready[:, i]
        elif i in self.slots:
            g = self.slots[i]
        elif ids is not None and vector:
            return self.stream.gumbel_at(self.index[:, i:i + 1], ids)[:, 0]
        else:
            g = self.slots[i] = _noise(self.stream, self.index[:, i:i + 1], self.sampling,
                                       self.vocab_size)[:, 0]
        return g.index_select(1, ids) if ids is not None and vector else g


@dataclass
class Window:
    """What a student's propose() sees of one window (B rows)."""
    k: int
    first: torch.Tensor          # (B,) y_1, the row's next token
    feature: torch.Tensor        # (B, D) the draft's output for the step that reads y_1
    pos: torch.Tensor            # (B,) RoPE position of y_1
    draft_cache: KVCache
    teacher_cache: KVCache       # read-only here (an oracle may copy it)
    noise: WindowNoise           # slot(i): the noise of y_{i+2} (a (B, k[, V]) tensor is wrapped)
    sampling: SamplingConfig
    q_logits: torch.Tensor | None = None   # (B, k-1, N) set by propose: the draft's logits

    def __post_init__(self) -> None:
        if torch.is_tensor(self.noise):
            self.noise = WindowNoise.given(self.noise, self.sampling)

    def sample(self, logits: torch.Tensor, i: int) -> torch.Tensor:
        """Token y_{i+2} from logits (B, V) over the whole vocabulary with its own noise."""
        return sample(logits, self.noise.slot(i), self.sampling)


def _noise(stream: NoiseStream, index: torch.Tensor, sampling: SamplingConfig, V: int
           ) -> torch.Tensor:
    if sampling.greedy:   # argmax ignores the noise: skip the O(V) Gumbel vectors
        return torch.zeros(index.shape, dtype=torch.float64, device=index.device)
    return token_noise(stream, index, sampling, V).to(index.device)


def _leading(ok: torch.Tensor) -> torch.Tensor:
    return ok.long().cumprod(1).sum(1)


_INVARIANT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batch_invariant(model: torch.nn.Module, rows: int) -> bool:
    """Whether every linear layer of `model` gives each of `rows` rows the bits it gives that row
    alone (probed once per model, dtype and row count on its own weights). True for bf16 on CPUs
    with AMX / AVX512-BF16 up to 32 rows; False for fp32 there (a one-row product takes another
    kernel). Only then does attending per query make a k-token pass repeat k steps exactly."""
    w0 = next(model.parameters())
    first = next((m.weight for m in model.modules() if isinstance(m, nn.Linear)), w0)
    key = (w0.dtype, w0.device, rows, first.stride())      # a new layout is probed anew
    known = _INVARIANT.setdefault(model, {})
    if key not in known:
        g = torch.Generator(device=w0.device).manual_seed(0)
        shapes = {m.weight.shape: m.weight for m in model.modules() if isinstance(m, nn.Linear)}
        known[key] = True
        for w in shapes.values():
            x = torch.randn(rows, w.shape[1], generator=g, device=w.device).to(w.dtype)
            y = torch.nn.functional.linear(x, w)
            if not all(torch.equal(y[i], torch.nn.functional.linear(x[i:i + 1], w)[0])
                       for i in range(rows)):
                known[key] = False
                break
    return known[key]


def _drop_rejected(cache: KVCache, start: int, a: torch.Tensor, ar_k: torch.Tensor,
                   same: int | None) -> None:
    """Take the slots after each row's accepted prefix (of the window at `start`) out of the
    teacher's cache. Where every active row kept as many (`same`), roll the cache back: it
    stays contiguous, as an AR cache is, and with per-query attention the next pass then
    computes bit for bit what AR steps would (where the kernels are batch-invariant).
    Otherwise mask them out."""
    if same is not None:
        cache.truncate(start + same + 1)
    else:
        cache.valid[:, start:start + len(ar_k)] &= ar_k[None] <= a[:, None]
        cache.has_padding = True


def _prefill(student: FeedbackStudent, t_cache: KVCache, d_cache: KVCache, ids: torch.Tensor,
             valid: torch.Tensor, pos: torch.Tensor, noise: NoiseStream,
             sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and draft read the prompts -> (first (B,), draft feature (B, D), teacher logits
    (B, V) at the last prompt token)."""
    teacher = student.teacher
    t_cache.mark_padding(valid)
    f = teacher(ids, input_pos=pos, cache=t_cache, return_hidden=True)           # (B, P, D)
    logits = teacher.output(f[:, -1])
    zero = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    first = sample(logits, _noise(noise, zero, sampling, student.vocab_size)[:, 0], sampling)
    d_cache.mark_padding(valid)
    h = student.draft(f, torch.cat([ids[:, 1:], first[:, None]], 1), pos, cache=d_cache)
    return first, h[:, -1], logits


def _draft_tree(widths: tuple[int, ...] | None, k: int, mode: str, refeed: bool,
                sampling: SamplingConfig) -> DraftTree | None:
    """The window's draft tree, or None for the plain chain."""
    if widths is None or all(w == 1 for w in widths):
        return None
    tree = widths if isinstance(widths, DraftTree) else DraftTree(tuple(widths))
    if len(tree.widths) != k - 1:
        raise KForcingError(f"a draft tree for k={k} needs {k - 1} widths, got {tree.widths}")
    if mode != "lossless":
        raise KForcingError("draft trees are verified: they need mode 'lossless'")
    if not refeed:
        raise KForcingError("draft trees need refeed=True (the draft re-reads the kept path)")
    if not sampling.greedy and sampling.coupling != "gumbel":
        raise KForcingError("draft trees need the Gumbel coupling (or greedy decoding)")
    return tree


def _verify_tree(student: FeedbackStudent, tree: DraftTree, win: Window, per_query: bool
                 ) -> tuple[torch.Tensor, ...]:
    """One lossless window over a draft tree: the draft proposes the tree, one teacher pass reads
    every node (each seeing its own ancestors) and gives its token after each node; the deepest
    node the teacher confirms ends the accepted path. Returns what the chain's window gives
    along that path, (B, k) each: tokens z, teacher tokens t, features F (B, k, D), positions;
    and a (B,) accepted proposals, path (B, k) node ids. The teacher's cache holds the nodes
    until accept_path commits the path."""
    teacher, B = student.teacher, win.first.shape[0]
    nodes = torch.cat([win.first[:, None], student.propose_tree(win, tree)], 1)   # (B, N)
    paths, depth = tree.on(nodes.device)
    npos = win.pos[:, None] + depth
    F = teacher(nodes, input_pos=npos, cache=win.teacher_cache, return_hidden=True,
                per_query=per_query, tree=tree)                                   # (B, N, D)
    logits = teacher.output(F)                                                     # (B, N, V)
    rows = torch.arange(B, device=nodes.device)
    best, t = tree.accept(nodes, lambda d, node: sample(logits[rows, node], win.noise.slot(d),
                                                        win.sampling))
    path = paths[best]                                                          # (B, k)
    return (nodes.gather(1, path), t, depth[best], F[rows[:, None], path], npos.gather(1, path),
            path)


def _verify_chain(logits: torch.Tensor, z: torch.Tensor, win: Window) -> torch.Tensor:
    """The teacher's token after each slot of a chain, t (B, k), from its logits (B, k, V):
    slot by slot, stopping once every row has rejected (the slots after that are never read;
    they repeat the last one drawn), so those slots' noise is never made."""
    B, k = z.shape
    t, alive = [], torch.ones(B, dtype=torch.bool, device=z.device)
    for j in range(k):
        t.append(sample(logits[:, j], win.noise.slot(j), win.sampling))
        if j == k - 1:
            break
        alive &= z[:, j + 1] == t[-1]
        if not bool(alive.any()):
            break
    return torch.stack(t + t[-1:] * (k - len(t)), 1)


def _chain_window(student: FeedbackStudent, win: Window, mode: str, compiled: bool,
                  per_query: bool) -> tuple[torch.Tensor, ...]:
    """One eager chain window: the draft proposes y_2..y_k, one teacher pass reads y_1..y_k
    (through the teacher's compiled graph when `compiled`; its slots' padding already marked).
    Returns z (B, k), the teacher's token after each slot t (B, k) (K-Forcing mode: the
    proposals, then its own after y_k), accepted proposals a (B,), the teacher's features
    F (B, k, D) and the positions (B, k)."""
    teacher, cache, k = student.teacher, win.teacher_cache, win.k
    z = torch.cat([win.first[:, None], student.propose(win)], 1)                  # (B, k)
    zpos = win.pos[:, None] + torch.arange(k, device=z.device)
    if compiled:
        F = teacher.compiled_pass(z, zpos, cache, hidden=True)
    else:
        F = teacher(z, input_pos=zpos, cache=cache, return_hidden=True, per_query=per_query)
    if mode == "lossless":
        t = _verify_chain(teacher.output(F), z, win)
        return z, t, _leading(z[:, 1:] == t[:, :-1]), F, zpos  # accepted proposals, [0, k-1]
    last = sample(teacher.output(F[:, -1]), win.noise.slot(-1), win.sampling)
    t = torch.cat([z[:, 1:], last[:, None]], 1)
    return z, t, torch.full_like(win.pos, k - 1), F, zpos


@torch.inference_mode()
def generate_feedback(student: FeedbackStudent, prompts: list[list[int]], max_new_tokens: int,
                      *, k: int | None = None, mode: str = "kforcing",
                      sampling: SamplingConfig | None = None, noise: NoiseStream | None = None,
                      seed: int = 0, eos_id: int | None = None, stop_at_eos: bool = True,
                      refeed: bool = True, on_tokens: OnTokens | None = None,
                      tree: tuple[int, ...] | None = None) -> GenerationResult:
    """Decode k tokens per teacher pass (mode 'kforcing') or sample the teacher exactly with k-1
    draft proposals per pass (mode 'lossless'). sampling defaults to temperature 1 under the
    student's coupling; noise defaults to NoiseStream.from_seed(seed, len(prompts)).
    extra: mode, k, coupling, windows (teacher passes after the prefill), tokens_per_pass
    (tokens a row gains per window, mean over active rows), refeed. on_tokens: streaming
    callback (decoding.common.OnTokens). tree (lossless): k - 1 widths of a draft tree
    (core.tree), verified in the same single teacher pass; None or all ones is the chain."""
    if mode not in MODES:
        raise KForcingError(f"mode must be one of {MODES}, got '{mode}'")
    k = student.config.max_k if k is None else k
    check_k(k, student.config.max_k)
    if not isinstance(student, FeedbackStudent):
        raise KForcingError("generate_feedback needs a feedback student (load_feedback)")
    B = len(prompts)
    teacher = student.teacher
    tc = teacher.config
    check_prompts(prompts, max_new_tokens, tc.max_seq_len, tc.vocab_size, reserved=k,
                  why=f"the k={k} window")
    device = teacher.tok_embeddings.weight.device
    sampling = sampling or SamplingConfig(coupling=student.config.coupling)
    tree = _draft_tree(tree, k, mode, refeed, sampling)
    noise = noise_for(noise, seed, B, device)
    eos = (tc.eos_id if eos_id is None else eos_id) if stop_at_eos else None
    ids, valid, pos = left_pad(prompts, device)
    # K-Forcing mode commits k slots a window, at most ceil(max_new_tokens / k) windows; a
    # lossless window can keep a single token of its k slots
    windows = -(-max_new_tokens // k) if mode == "kforcing" else max_new_tokens
    cap = ids.shape[1] + k * (windows + 1) + (tree.levels + tree.size if tree else 0)
    # K-Forcing mode's chain windows run as one compiled graph when the student has one
    # (feedback_window.compile_window); its caches come in fewer sizes
    whole = (mode == "kforcing" and tree is None and refeed
             and student.compiled_window is not None)
    if whole:
        cap = -(-cap // CACHE_ROUND) * CACHE_ROUND
    t_cache = KVCache.for_model(teacher, B, max_len=cap)
    d_cache = student.new_cache(B, max_len=cap + (tree.size if tree else k))
    sync = sync_fn(device)
    streamer = Streamer(on_tokens, B, max_new_tokens, eos)

    # one row's lossless windows can repeat AR's arithmetic exactly (module docstring)
    per_query = (mode == "lossless" and B == 1
                 and batch_invariant(teacher, tree.size if tree else k))
    # K-Forcing mode's teacher passes go through the teacher's compiled graph when it has one
    # (Transformer.compile_decode); lossless verification keeps the eager passes
    compiled = mode == "kforcing" and teacher.compiled_step is not None
    t0 = time.perf_counter()
    first, h, _ = _prefill(student, t_cache, d_cache, ids, valid, pos, noise, sampling)
    sync()
    t1 = time.perf_counter()
    out = torch.zeros(B, max_new_tokens + k + 1, dtype=torch.long, device=device)
    dump = out.shape[1] - 1                       # column that takes discarded writes
    n = torch.zeros(B, dtype=torch.long, device=device)        # tokens emitted per row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    p = pos[:, -1] + 1                                          # position of `first`
    ar_k = torch.arange(k, device=device)
    rows = torch.arange(B, device=device)
    windows = gained = row_passes = 0
    while max_new_tokens and bool((active := ~done & (n < max_new_tokens)).any()):
        index = n[:, None] + 1 + ar_k                                  # the tokens' noise
        spec = d_cache.length
        if tree is None:             # a chain's k slots: finished rows' are padding
            t_cache.mark_padding(active[:, None].expand(B, k))
        if whole:
            z, t, h = window_pass(student, first, h, p, noise, index, sampling, t_cache, d_cache)
            a = torch.full_like(n, k - 1)
        else:
            win = Window(k, first, h, p, d_cache, t_cache,
                         WindowNoise(noise, index, sampling, tc.vocab_size), sampling)
            if tree is not None:
                z, t, a, F, zpos, path = _verify_tree(student, tree, win, per_query)
            else:
                start = t_cache.length
                z, t, a, F, zpos = _chain_window(student, win, mode, compiled, per_query)
        windows += 1
        # where every active row accepted as many (always at batch 1), rejected slots are rolled
        # back in both caches instead of masked: no padding masks, and AR's cache layout
        if mode == "kforcing":       # every active row keeps its k tokens
            same = k - 1
        else:
            kept = a[active]
            same = int(kept[0]) if bool((kept == kept[0]).all()) else None
        if tree is not None:
            t_cache.accept_path(path, torch.where(active, a + 1, 0),
                                None if same is None else same + 1)
        elif mode == "lossless":
            _drop_rejected(t_cache, start, a, ar_k, same)
        keep = (ar_k[None] <= a[:, None]) & active[:, None]
        out.scatter_(1, torch.where(keep, n[:, None] + ar_k, dump).clamp(max=dump), z)
        if eos is not None:
            done |= ((z == eos) & keep).any(1)
        live = int(active.sum())
        gained += k * live if mode == "kforcing" else int((a + 1)[active].sum())
        row_passes += live
        stop = streamer.push(z, torch.where(active, a + 1, 0))
        if stop is not None:
            done |= stop
        # the draft re-reads what was committed, with the teacher's features (a compiled
        # window has done so itself)
        if refeed and not whole:
            d_cache.truncate(spec)
            if same is not None:     # only the kept slots (finished rows' are never read again)
                h = student.draft(F[:, :same + 1], t[:, :same + 1], zpos[:, :same + 1],
                                  cache=d_cache)[:, -1]
            else:
                d_cache.mark_padding(keep)
                h = student.draft(F, t, zpos, cache=d_cache)[rows, a]
        elif not refeed:
            # keep the speculative entries (step j + 3 read slot j's token) that were accepted
            d_cache.valid[:, spec:d_cache.length] &= ar_k[None, :d_cache.length - spec] < a[:, None]
            d_cache.has_padding = True
            d_cache.mark_padding(active[:, None])
            h = student.draft(F[rows, a][:, None], t[rows, a][:, None], zpos[rows, a][:, None],
                              cache=d_cache)[:, 0]
        first = t[rows, a]
        step = torch.where(active, a + 1, 0)
        n, p = n + step, p + step
    sync()
    t2 = time.perf_counter()
    rows_out, finished = cut_at_eos(
        [r[:min(int(c), max_new_tokens)] for r, c in zip(out.tolist(), n.tolist(), strict=True)],
        eos)
    extra = {"mode": mode, "k": k, "coupling": sampling.coupling, "windows": windows,
             "tokens_per_pass": gained / row_passes if row_passes else 0.0, "refeed": refeed,
             "tree": list(tree.widths) if tree else None}
    return GenerationResult(streamer.cut(rows_out), finished, windows + 1, t1 - t0, t2 - t1,
                            extra=extra)


# -- measuring a window against the teacher's own chain ------------------------------------------

@dataclass
class WindowMatch:
    tokens: torch.Tensor        # (B, k) the student's window y_1..y_k
    teacher: torch.Tensor       # (B, k) the teacher's AR chain g_1..g_k under the same noise
    overlap2: torch.Tensor      # (B,) 1 - TV(q_2, p(. | context, y_1)): any coupling's ceiling

    @property
    def match(self) -> torch.Tensor:
        return self.tokens == self.teacher                               # (B, k)


@torch.inference_mode()
def window_match(student: FeedbackStudent, contexts: torch.Tensor, k: int,
                 sampling: SamplingConfig, noise: NoiseStream) -> WindowMatch:
    """One window after each context (B, C) (no padding) against the teacher's AR chain with the
    same noise (token j of a row uses the noise of index j): y_1 = g_1 is the teacher's sample,
    y_2..y_k come from the draft, g_2..g_k from k-1 teacher steps."""
    check_k(k, student.config.max_k)
    teacher = student.teacher
    B, C = contexts.shape
    device = contexts.device
    pos = torch.arange(C, device=device).expand(B, C)
    valid = torch.ones(B, C, dtype=torch.bool, device=device)
    t_cache = KVCache.for_model(teacher, B, max_len=C + k)
    d_cache = student.new_cache(B, max_len=C + k)
    first, h, _ = _prefill(student, t_cache, d_cache, contexts, valid, pos, noise, sampling)
    index = torch.arange(1, k + 1, device=device).expand(B, k)
    G = _noise(noise, index, sampling, student.vocab_size)
    win = Window(k, first, h, pos[:, -1] + 1, d_cache, t_cache, G, sampling)
    y = torch.cat([first[:, None], student.propose(win)], 1)
    g = [first]
    overlap = torch.ones(B, device=device)
    for i in range(1, k):
        logits = teacher(g[-1][:, None], input_pos=pos[:, -1:] + i, cache=t_cache)[:, -1]
        g.append(sample(logits, G[:, i - 1], sampling))
        if i == 1:
            p2 = probs_from_logits(logits, sampling)
            q2 = probs_from_logits(student.full_logits(win.q_logits[:, 0]), sampling)
            overlap = 1 - 0.5 * (p2 - q2).abs().sum(-1)
    return WindowMatch(y, torch.stack(g, 1), overlap)


def summarize_matches(matches: list[WindowMatch]) -> dict:
    """Per-position, prefix and joint match, 1 - TV at position 2 and the lossless tokens per
    teacher pass the prefixes imply (1 + expected accepted proposals), as fractions."""
    m = torch.cat([w.match for w in matches]).float()                     # (N, k)
    prefix = m.cumprod(1).mean(0)
    return {"windows": m.shape[0], "per_position": [round(float(x), 4) for x in m.mean(0)],
            "prefix": [round(float(x), 4) for x in prefix], "joint": round(float(prefix[-1]), 4),
            "overlap2": round(float(torch.cat([w.overlap2 for w in matches]).mean()), 4),
            "tokens_per_pass": round(1 + float(prefix[1:].sum()), 4)}
