"""The token-feedback student (docs/METHOD.md section 9): a frozen teacher plus a small draft
whose steps see the tokens chosen before them in the window.

A window of k tokens: the teacher's logits at the last committed token give y_1 (an exact
teacher sample). The draft then runs k-1 cheap sequential steps: step i reads
(feature, embedding(y_{i-1})), where the feature is the teacher's final hidden state at the last
committed position for i = 2 and the draft's own previous output after that, and gives q_i
through the teacher's final norm and output head; y_i is drawn from q_i with token i's noise.
With the Gumbel coupling (y = argmax(log q + g), the same g the teacher's sampler uses for that
token), the draft agrees with the teacher about as often as 1 - TV(q_i, p_i) allows.

The teacher is held by reference (out of state_dict and parameters(); `_apply` carries it
through .to()/.cuda()/.half()), so its KV cache and logits stay exactly the teacher's. A saved
student holds the draft's weights, its config and the teacher's directory path.

Draft vocabulary (optional): q over the N most frequent corpus token ids only, mapped back to
full ids (every other token gets probability 0): the output head shrinks from V x dim to N x dim,
and a draft token is drawn over those N ids with the noise at those ids only (draw()).

Decoding cost: a draft step is one block, the head and a draw, against the teacher's whole
stack for an AR step. propose() prepares each window's RoPE rows and padding mask once and
matches the draft() path bit for bit; compile_draft() opts in to one compiled graph per step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kforcing.core.config import from_dict, load_json
from kforcing.core.device import same_layout
from kforcing.core.kv_cache import KVCache
from kforcing.core.model import Block, RMSNorm, Transformer, causal_mask
from kforcing.core.sampling import COUPLINGS, SamplingConfig, sample, top_tokens
from kforcing.core.tree import DraftTree
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    atomic_save_tensors,
    atomic_write_json,
    load_model,
    load_tensors,
    resolve_model_dir,
)

FEEDBACK_FILE, FEEDBACK_JSON = "feedback.safetensors", "feedback.json"


@dataclass
class FeedbackConfig:
    max_k: int = 4
    draft_layers: int = 1
    draft_vocab_size: int | None = None   # None: the teacher's whole vocabulary
    coupling: str = "gumbel"
    tau_min: float = 0.7                  # temperatures the draft is trained for
    tau_max: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_k, int) or self.max_k < 1:
            raise KForcingError(f"max_k must be a positive integer, got {self.max_k!r}")
        if not isinstance(self.draft_layers, int) or self.draft_layers < 1:
            raise KForcingError(f"draft_layers must be a positive integer, got "
                                f"{self.draft_layers!r}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise KForcingError(f"draft_vocab_size must be positive or None, got "
                                f"{self.draft_vocab_size}")
        if self.coupling not in COUPLINGS:
            raise KForcingError(f"coupling must be one of {COUPLINGS}, got '{self.coupling}'")
        if not 0 < self.tau_min <= self.tau_max or not math.isfinite(self.tau_max):
            raise KForcingError(f"need 0 < tau_min <= tau_max, got {self.tau_min}, "
                                f"{self.tau_max}")


def check_k(k: int, max_k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise KForcingError(f"k must be a positive integer, got {k!r}")
    if k > max_k:
        raise KForcingError(f"k={k} exceeds this feedback student's max_k={max_k}")


class GrowingKV:
    """A KV store that grows by concatenation instead of in-place writes, so a training pass can
    run several sequential draft steps and backpropagate through all of them (KVCache writes
    into a preallocated buffer, which autograd cannot differentiate across later writes). Same
    write/commit protocol as KVCache; callers always pass an explicit mask."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, store: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        K = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        V = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)
        if store:
            self.k[layer], self.v[layer] = K, V
        return K, V

    def commit(self, n: int) -> None:
        self.length += n


class FeedbackStudent(nn.Module):
    def __init__(self, teacher: Transformer, cfg: FeedbackConfig,
                 draft_ids: torch.Tensor | None = None):
        super().__init__()
        tc = teacher.config
        self.config = cfg
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        # the draft's blocks have the teacher's width and attention shape
        self.draft_config = replace(tc, n_layer=cfg.draft_layers, dropout=0.0)
        self.feat_norm = RMSNorm(tc.dim, tc.norm_eps)
        self.tok_norm = RMSNorm(tc.dim, tc.norm_eps)
        self.fc = nn.Linear(2 * tc.dim, tc.dim, bias=False)
        self.layers = nn.ModuleList(Block(self.draft_config, i) for i in range(cfg.draft_layers))
        self._init_weights()
        if cfg.draft_vocab_size is not None:
            if draft_ids is None:
                raise KForcingError("a draft vocabulary needs its token ids (draft_ids)")
            draft_ids = torch.as_tensor(draft_ids, dtype=torch.long).flatten()
            if draft_ids.numel() != cfg.draft_vocab_size:
                raise KForcingError(f"draft_ids has {draft_ids.numel()} ids, the config says "
                                    f"draft_vocab_size={cfg.draft_vocab_size}")
            if draft_ids.numel() and not 0 <= int(draft_ids.min()) <= int(draft_ids.max()) \
                    < tc.vocab_size:
                raise KForcingError(f"draft_ids must lie in [0, {tc.vocab_size})")
            if draft_ids.unique().numel() != draft_ids.numel():
                raise KForcingError("draft_ids has repeated token ids")
            self.register_buffer("draft_ids", draft_ids.clone())
        else:
            self.draft_ids = None
        self.compiled_draft = None     # compile_draft()
        self.compiled_window = None    # decoding.feedback_window.compile_window()

    def _init_weights(self) -> None:
        # as the teacher's own init (Transformer._init_weights), except fc: its feature half
        # starts as the identity, so an untrained draft predicts roughly the teacher's current
        # distribution instead of noise
        for m in self.layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.layers.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.draft_layers))
        dim = self.fc.out_features
        with torch.no_grad():
            nn.init.normal_(self.fc.weight, std=0.02)
            self.fc.weight[:, :dim] += torch.eye(dim)

    def _apply(self, fn, recurse=True):
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @property
    def model_config(self):
        return self.teacher.config

    @property
    def vocab_size(self) -> int:
        return self.teacher.config.vocab_size

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """The draft's own KV cache (draft_layers layers)."""
        c, p = self.draft_config, self.teacher.tok_embeddings.weight
        return KVCache(c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_len,
                       device=p.device, dtype=self.fc.weight.dtype)

    # -- the draft ------------------------------------------------------------------------------
    def draft(self, feature: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, *,
              cache: KVCache | GrowingKV | None = None, mask: torch.Tensor | None = None
              ) -> torch.Tensor:
        """feature (B, T, D) normed hidden states, tokens (B, T) the token after each, pos (B, T)
        RoPE positions -> the draft's features (B, T, D) (the teacher's final norm applied).

        Entry t predicts the token two after the feature's position: fed (f_t, x_{t+1}) it
        predicts x_{t+2}. With a KVCache all T entries are committed (causal mask, padding
        slots masked out); a GrowingKV or no cache needs `mask` or plain causal attention.
        """
        x = self._mix(feature, tokens)
        B, T, _ = x.shape
        cos, sin = self.teacher.rope(pos if pos.dim() == 2 else pos.expand(B, T))
        if mask is None and isinstance(cache, KVCache):
            cache.check_room(T)
            past = cache.length
            if T > 1 or cache.has_padding:
                valid = cache.valid[:, :past + T] if cache.has_padding else None
                mask = causal_mask(T, past, valid, device=x.device)
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)
        return self._blocks(x, cos, sin, mask, cache)

    def _mix(self, feature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(feature (B, T, D), tokens (B, T)) -> the first block's input (B, T, D)."""
        emb = self.teacher.tok_embeddings(tokens)
        return self.fc(torch.cat([self.feat_norm(feature.to(emb.dtype)), self.tok_norm(emb)], -1))

    def _blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | GrowingKV | None) -> torch.Tensor:
        """The draft's blocks over x (B, T, D), committing T entries, then the final norm."""
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.commit(x.shape[1])
        return self.teacher.norm(x)

    def head_weight(self) -> torch.Tensor:
        """(V or N, D): the teacher's output head, restricted to the draft vocabulary. The
        restricted copy is kept between calls (gathering N rows of a large head on every draft
        step cost more than the step itself) and remade when the head or the ids change."""
        w = self.teacher.output.weight
        if self.draft_ids is None:
            return w
        version = None if w.is_inference() else w._version   # inference tensors have none
        key = (w.data_ptr(), version, w.dtype, w.device, self.draft_ids.data_ptr())
        if getattr(self, "_head_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():
                head = same_layout(w[self.draft_ids], w)   # a normal tensor (training uses it)
            object.__setattr__(self, "_head", head)
            object.__setattr__(self, "_head_key", key)
        return self._head

    def draft_logits(self, feature: torch.Tensor) -> torch.Tensor:
        """feature (..., D) -> q's logits over the draft vocabulary (..., N), or the full one."""
        return F.linear(feature, self.head_weight())

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """feature (..., D) -> q's logits (..., V) over the full vocabulary (-inf outside the
        draft vocabulary)."""
        return self.full_logits(self.draft_logits(feature))

    def draw(self, small: torch.Tensor, window, i: int) -> torch.Tensor:
        """Draft token y_{i+2} (B,) from its logits over the draft vocabulary (B, N), with that
        token's noise at those ids only: the full vocabulary's draw up to rounding (every
        other token has q = 0), at N / V of its cost."""
        return self.draw_with(small, window.noise.slot(i, self.draft_ids), window.sampling)

    def draw_with(self, small: torch.Tensor, noise: torch.Tensor, sampling: SamplingConfig
                  ) -> torch.Tensor:
        """draw() given the token's noise at the draft vocabulary's ids (the compiled graphs
        make or take it themselves): full token ids (B,)."""
        y = sample(small, noise, sampling)
        return y if self.draft_ids is None else self.draft_ids[y]

    def full_logits(self, small: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (..., N) -> full ones (..., V), -inf elsewhere."""
        if self.draft_ids is None:
            return small
        full = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_ids, small)

    def propose(self, window) -> torch.Tensor:
        """The k-1 draft steps of a window (see decoding.feedback.Window): returns the proposals
        y_2..y_k (B, k-1) and leaves their logits over the draft vocabulary in window.q_logits
        (B, k-1, N). Its speculative entries in window.draft_cache are rolled back by the
        caller."""
        if window.k == 1:
            return window.first.new_zeros(window.first.shape[0], 0)
        step = self._stepper(window)
        h, y = window.feature, window.first
        toks, logits = [], []
        for i in range(window.k - 1):
            if i == 0:
                q = self.draft_logits(h)
                y = self.draw(q, window, 0)
            else:   # step i + 2 reads the previous step's output and token
                h, q, y = step(h, y, i)
            toks.append(y)
            logits.append(q)
        window.q_logits = torch.stack(logits, 1)
        return torch.stack(toks, 1)

    def propose_tree(self, window, tree: DraftTree) -> torch.Tensor:
        """A draft tree's nodes 1..N-1 (B, N-1), breadth first (core.tree): a node's children are
        the draft's top-`width` tokens under the noise of their token index, ranked as the
        sampler ranks them (the chain proposes the top 1). Each inner node's draft step reads
        (its parent's feature, its token) and attends to its ancestors' entries only; those
        speculative entries in window.draft_cache are rolled back by the caller."""
        cache, spec = window.draft_cache, window.draft_cache.length
        h = window.feature[:, None]                                          # (B, 1, D)
        B, toks = h.shape[0], []
        for d, w in enumerate(tree.widths, start=1):
            toks.append(self._children(h, window.noise.slot(d - 1, self.draft_ids),
                                       window.sampling, w))
            if d == len(tree.widths):
                break
            ids = tree.level(d)
            n = len(ids)
            cache.check_room(n)
            prefix = (cache.valid[:, None, :spec] if cache.has_padding
                      else torch.ones(1, 1, spec, dtype=torch.bool, device=h.device))
            anc = tree.ancestors[ids.start:ids.stop, 1:ids.stop].to(h.device)  # entry j at spec+j-1
            mask = torch.cat([prefix.expand(B, n, spec), anc[None].expand(B, -1, -1)], 2)
            pos = (window.pos[:, None] + d - 1).expand(B, n)
            h = self.draft(h.repeat_interleave(w, 1), toks[-1], pos, cache=cache, mask=mask)
        return torch.cat(toks, 1)

    def _children(self, h: torch.Tensor, noise: torch.Tensor, sampling: SamplingConfig, w: int
                  ) -> torch.Tensor:
        """h (B, n, D), the token index's noise at the draft vocabulary's ids -> (B, n * w): each
        node's top-w tokens, scored over the draft vocabulary only (the rest have q = 0 and
        never rank)."""
        B, n, D = h.shape          # 2-D: a strided 3-D input makes matmul copy the head per row
        small = self.draft_logits(h.reshape(B * n, D)).view(B, n, -1)         # (B, n, N)
        if w > small.shape[-1]:
            raise KForcingError(f"a draft-tree width of {w} exceeds the draft's vocabulary of "
                                f"{small.shape[-1]} tokens")
        top = top_tokens(small, noise, sampling, w).flatten(1)
        return top if self.draft_ids is None else self.draft_ids[top]

    def propose_stepwise(self, window) -> torch.Tensor:
        """What propose computes, written plainly: every step through draft(), logits() and the
        window's sampler. The definition the fast path must equal bit for bit (tests/
        test_feedback_speed.py) and the baseline experiments/draft_cost.py times it against."""
        def step(i, h, y):
            if i > 0:
                h = self.draft(h[:, None], y[:, None], window.pos[:, None] + i - 1,
                               cache=window.draft_cache)[:, 0]
            return h, self.draft_logits(h)
        return self.propose_with(window, step, lambda q, i: self.draw(q, window, i))

    @staticmethod
    def propose_with(window, step, draw=None) -> torch.Tensor:
        """A window's proposals drawn one step at a time: step(i, h, y) -> (h, q) gives step i's
        state and logits from the previous state (the window's feature at first) and token;
        each token is drawn with its own noise by draw(q, i) (default: window.sample, over the
        whole vocabulary). Returns y_2..y_k (B, k-1) and leaves the logits in
        window.q_logits."""
        draw = draw or window.sample
        h, y = window.feature, window.first
        toks, logits = [], []
        for i in range(window.k - 1):
            h, q = step(i, h, y)
            y = draw(q, i)
            toks.append(y)
            logits.append(q)
        if not toks:
            return window.first.new_zeros(window.first.shape[0], 0)
        window.q_logits = torch.stack(logits, 1)
        return torch.stack(toks, 1)

    def _stepper(self, window):
        """Steps i = 1..k-2 of a window as one function (h (B, D), y (B,), i) -> (h, q (B, V),
        y): draft() with T = 1 at RoPE position pos + i - 1, the head and the draw. The RoPE rows
        and the padding mask of every step are prepared once per window: at batch 1 the
        per-step gathers, position check and mask building cost about what the block's matmuls
        do. With compile_draft() the block, head and draw run as one compiled graph."""
        cache, n = window.draft_cache, window.k - 2
        pos = window.pos[:, None] + torch.arange(n, device=window.pos.device)          # (B, n)

        def generic(h, y, i):
            h = self.draft(h[:, None], y[:, None], pos[:, i - 1:i], cache=cache)[:, 0]
            q = self.draft_logits(h)
            return h, q, self.draw(q, window, i)

        if not isinstance(cache, KVCache):
            return generic
        cache.check_room(n)
        past = cache.length
        if cache.has_padding and not bool(cache.valid[:, past:past + n].all()):
            return generic
        # a one-token step sees every slot up to its own, and its own is valid: the validity
        # row itself is the mask draft() builds, a view with no per-step work
        valid = cache.valid[:, None, None] if cache.has_padding else None   # (B, 1, 1, max_len)
        cos, sin = self.teacher.rope(pos)                                      # (B, 1, n, D)
        head = self.head_weight()
        if self.compiled_draft is not None:
            return self._compiled_stepper(window, cos, sin, head)

        def step(h, y, i):
            mask = None if valid is None else valid[..., :cache.length + 1]
            h = self._step(h, y, cos[:, :, i - 1:i], sin[:, :, i - 1:i], mask, cache)
            q = F.linear(h, head)
            return h, q, self.draw(q, window, i)

        return step

    def _step(self, h: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: torch.Tensor | None, cache: KVCache | GrowingKV) -> torch.Tensor:
        """One draft step: h (B, D), y (B,) -> h (B, D), one entry committed to the cache."""
        return self._blocks(self._mix(h[:, None], y[:, None]), cos, sin, mask, cache)[:, 0]

    def _compiled_stepper(self, window, cos, sin, head):
        """The compiled form of _stepper's step. The graph reads the cache and hands the step's
        K/V back, written here: an in-place write into a graph input makes the compiled graph
        copy the whole buffer. The mask is always passed (all true without padding), so one
        graph serves padded and unpadded caches."""
        cache = window.draft_cache

        def step(h, y, i):
            L = cache.length
            if i == 1:   # a fresh buffer: the window's feature is a view at a varying offset
                h = h.clone()
            h, q, y, ks, vs = self.compiled_draft(
                h, y, cos[:, :, i - 1:i], sin[:, :, i - 1:i], cache.valid[:, None, None, :L + 1],
                [k[:, :, :L] for k in cache.k], [v[:, :, :L] for v in cache.v], head,
                window.noise.slot(i, self.draft_ids), window.sampling)
            for layer, (k, v) in enumerate(zip(ks, vs, strict=True)):
                cache.k[layer][:, :, L:L + 1] = k
                cache.v[layer][:, :, L:L + 1] = v
            cache.commit(1)
            return h, q, y

        return step

    def _step_and_draw(self, h: torch.Tensor, y: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, mask: torch.Tensor, past_k: list[torch.Tensor],
                       past_v: list[torch.Tensor], head: torch.Tensor, noise: torch.Tensor,
                       sampling: SamplingConfig) -> tuple:
        """What compile_draft compiles: a step over the cached K/V (per layer (B, Hkv, L, D)),
        its logits over the draft vocabulary (B, N), its token (B,) drawn as draw() draws it
        (noise: the token's, at the draft vocabulary's ids), and the step's K/V (per layer
        (B, Hkv, 1, D))."""
        kv = GrowingKV(len(self.layers))
        kv.k, kv.v = list(past_k), list(past_v)
        h = self._step(h, y, cos, sin, mask, kv)
        q = F.linear(h, head)
        return (h, q, self.draw_with(q, noise, sampling), [k[:, :, -1:] for k in kv.k],
                [v[:, :, -1:] for v in kv.v])

    def compile_draft(self, **options) -> FeedbackStudent:
        """Opt in to compiled draft steps: steps 2..k-1 of a window (block, head, draw) run as one
        torch.compile graph (CPU: inductor, needs a C++ compiler; options go to torch.compile).
        The first windows compile (tens of seconds; again for batch 1 and for each sampling
        setting); the cache length is a dynamic shape, so a growing cache does not recompile.
        Fused kernels round differently from eager ones, so a proposal can differ in a near-tie:
        lossless output stays exact (the teacher verifies), K-Forcing output may change. It pays
        most where the draw dominates (batch > 1): the graph fuses the softmax, noise and argmax.
        Returns self."""
        self.compiled_draft = torch.compile(self._step_and_draw, dynamic=True, **options)
        return self


# -- on disk -------------------------------------------------------------------------------------

def save_feedback(student: FeedbackStudent, out: str | Path, teacher_dir: str | Path,
                  extra: dict | None = None) -> Path:
    """feedback.safetensors (the draft only) + feedback.json (config, teacher path, extra)."""
    out = Path(out)
    atomic_save_tensors(out / FEEDBACK_FILE, dict(student.state_dict()), metadata={"format": "pt"})
    atomic_write_json(out / FEEDBACK_JSON, {"feedback": asdict(student.config),
                                            "teacher": str(Path(teacher_dir).resolve()),
                                            **(extra or {})})
    tok = resolve_model_dir(teacher_dir) / "tokenizer.json"
    if tok.is_file():
        (out / "tokenizer.json").write_bytes(tok.read_bytes())
    return out


def resolve_feedback_dir(path: str | Path) -> Path:
    """A feedback student directory, or a run directory whose checkpoints/latest.json names one."""
    d = Path(path)
    if not d.exists():
        raise KForcingError(f"checkpoint not found: {path}")
    if (d / FEEDBACK_JSON).is_file():
        return d
    latest = d / "checkpoints" / "latest.json"
    if latest.is_file():
        name = load_json(latest)
        if isinstance(name, dict) and isinstance(name.get("name"), str):
            sub = d / "checkpoints" / name["name"]
            if (sub / FEEDBACK_JSON).is_file():
                return sub
    raise KForcingError(f"no feedback student in {path}: expected {FEEDBACK_JSON}")


def is_feedback_dir(path: str | Path) -> bool:
    try:
        resolve_feedback_dir(path)
        return True
    except KForcingError:
        return False


def load_feedback(path: str | Path, device: str | torch.device = "cpu",
                  teacher: Transformer | None = None) -> FeedbackStudent:
    """Rebuild a feedback student from its directory; its teacher is loaded from the saved path
    unless given (a teacher already in memory is shared, not copied)."""
    d = resolve_feedback_dir(path)
    meta = load_json(d / FEEDBACK_JSON)
    if not isinstance(meta, dict) or "feedback" not in meta or "teacher" not in meta:
        raise KForcingError(f"corrupt {d / FEEDBACK_JSON}: expected 'feedback' and 'teacher'")
    cfg = from_dict(FeedbackConfig, meta["feedback"])
    if teacher is None:
        if not Path(meta["teacher"]).exists():
            raise KForcingError(f"the teacher of {d} is missing: {meta['teacher']} not found")
        teacher = load_model(meta["teacher"], device=device)
    state = load_tensors(d / FEEDBACK_FILE)
    student = FeedbackStudent(teacher, cfg, state.get("draft_ids"))
    try:
        student.load_state_dict(state)
    except RuntimeError as e:
        raise KForcingError(f"{d / FEEDBACK_FILE} does not match its config: "
                            f"{str(e).splitlines()[0]}") from None
    return student.to(device).eval()
