"""A token-feedback student's K-Forcing window as one compiled graph (docs/METHOD.md section 5).

In K-Forcing mode a window has no data-dependent control flow: the draft proposes y_2..y_k
(the first proposal from the window's feature, k-2 draft steps after it), one teacher pass
reads [y_1..y_k] and draws the next window's first token from its logits at y_k, and the draft
re-reads the window with the teacher's features, which gives the next window's feature.
`WindowGraph` writes exactly that (decoding/feedback.py's eager loop, refeed on, no tree) as
static-shape code over the two caches' whole buffers, the way Transformer.decode_static writes
one pass; `compile_window` compiles it as one torch.compile graph. The draft's speculative
steps write the draft-cache slots that its re-read then overwrites, so nothing is rolled back.

Every draw uses the noise the eager loop gives it, so the output is the eager window's up to
rounding: fused kernels round differently, and a near-tie can then fall the other way (as with
compile_decode and compile_draft). Lossless mode keeps its eager, exact verification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kforcing.core.device import compile_options
from kforcing.core.kv_cache import KVCache
from kforcing.core.model import static_slots, static_stack
from kforcing.core.noise import NoiseStream, gumbel_from_hashes, token_hashes
from kforcing.core.sampling import SamplingConfig, sample


class WindowGraph(nn.Module):
    """(first, feature, position, noise, caches) -> (window tokens, next first, next feature);
    registers the student and its teacher, so compiling it freezes both sets of weights."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.teacher = student.teacher

    def forward(self, first: torch.Tensor, h: torch.Tensor, p: torch.Tensor,
                noise: torch.Tensor, head: torch.Tensor, t_slots: torch.Tensor,
                t_valid: torch.Tensor, t_ks: list[torch.Tensor], t_vs: list[torch.Tensor],
                t_span: int, d_slots: torch.Tensor, d_valid: torch.Tensor,
                d_ks: list[torch.Tensor], d_vs: list[torch.Tensor], d_span: int,
                sampling: SamplingConfig,
                gumbel: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """first (B,) y_1 at RoPE positions p (B,), h (B, D) the draft's feature for the step
        that reads y_1, noise (B, k[, V]) (noise[:, i] draws y_{i+2}, the last one the next
        first), head the draft's output head (FeedbackStudent.head_weight). The teacher's k
        K/V go to t_slots of t_ks / t_vs, the draft's to d_slots; spans as static_slots gives
        them. With gumbel = (the rows' NoiseStream.gumbel_state, its vocab_words), noise holds
        the tokens' indices (B, k) and the graph draws their Gumbel vectors itself (core.noise:
        token_hashes, gumbel_from_hashes). Returns z (B, k) = y_1..y_k, the token after each of
        them (B, k) (y_2..y_k, then the next window's first) and the next feature (B, D)."""
        s, t, ids = self.student, self.teacher, self.student.draft_ids
        k = noise.shape[1]
        if gumbel is not None:     # the draft's draws need only its vocabulary's entries
            state, words = gumbel
            hashes = token_hashes(state, noise)                                   # (B, k)
            draft_noise = gumbel_from_hashes(hashes[:, :-1],
                                             words if ids is None else words[ids])  # (B, k-1, N)
            last_noise = gumbel_from_hashes(hashes[:, -1], words)                 # (B, V)
        else:
            draft_noise, last_noise = noise[:, :-1], noise[:, -1]
        y, toks = first, [first]
        for i in range(k - 1):
            if i:    # draft step i reads (h, y_{i+1}) at position p + i - 1
                h = self._draft(s._mix(h[:, None], y[:, None]), (p + i - 1)[:, None],
                                d_slots[i - 1:i], d_valid, d_ks, d_vs, d_span)[:, 0]
            y = s.draw_with(F.linear(h, head), draft_noise[:, i], sampling)
            toks.append(y)
        z = torch.stack(toks, 1)                                                  # (B, k)
        zpos = p[:, None] + torch.arange(k, device=p.device)
        feats = t.decode_static(z, zpos, t_slots, t_valid, t_ks, t_vs, t_span, hidden=True)
        nxt = sample(t.output(feats[:, -1]), last_noise, sampling)
        after = torch.cat([z[:, 1:], nxt[:, None]], 1)
        h = self._draft(s._mix(feats, after), zpos, d_slots, d_valid, d_ks, d_vs, d_span)
        return z, after, h[:, -1]

    def _draft(self, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
               valid: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], span: int
               ) -> torch.Tensor:
        """The draft's blocks over x (B, T, D) at positions pos (B, T), then the teacher's
        final norm (FeedbackStudent._blocks, on static buffers)."""
        rope = self.teacher.static_rope(pos)
        return self.teacher.norm(static_stack(self.student.layers, x, rope, slots, valid, ks, vs,
                                              span))


def compile_window(student, **options):
    """Opt in to compiled K-Forcing windows for a token-feedback student: WindowGraph as one
    torch.compile graph (CPU: inductor with frozen weights and a C++ wrapper, core.device.
    compile_options, needs a C++ compiler; options go to torch.compile). generate_feedback
    then runs K-Forcing mode's chain windows through it. The first window compiles; a new
    batch size, k or cache size compiles once more with dynamic shapes. Call it after the
    final .to(). Returns the student."""
    graph = WindowGraph(student)
    options.setdefault("options", compile_options(student.teacher.output.weight.device))
    # not a submodule of the student: its state dict and .to() stay the student's own
    object.__setattr__(student, "compiled_window", torch.compile(graph, fullgraph=True,
                                                                 **options))
    return student


def window_pass(student, first: torch.Tensor, h: torch.Tensor, p: torch.Tensor,
                stream: NoiseStream, index: torch.Tensor, sampling: SamplingConfig,
                t_cache: KVCache, d_cache: KVCache
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One K-Forcing window through student.compiled_window (compile_window first), its
    tokens drawn with the noise of token indices index (B, k) of `stream`: under the Gumbel
    coupling the graph draws the vectors (O(B k V) work) itself. Both caches gain k committed
    slots (the teacher's after t_cache.mark_padding for the window). Returns z (B, k), the
    token after each slot (B, k) (its last, the next first token) and the next feature (B, D).
    """
    k = index.shape[1]
    gumbel = None
    if sampling.greedy:          # argmax ignores the noise
        noise = torch.zeros(index.shape, dtype=torch.float64, device=index.device)
    elif sampling.coupling == "gumbel":
        noise, gumbel = index, (stream.gumbel_state(), stream.vocab_words(student.vocab_size))
    else:
        noise = stream.uniforms(index)
    t_slots, t_span = static_slots(t_cache, k)
    d_slots, d_span = static_slots(d_cache, k)
    out = student.compiled_window(first, h, p, noise, student.head_weight(), t_slots,
                                  t_cache.valid, t_cache.k, t_cache.v, t_span, d_slots,
                                  d_cache.valid, d_cache.k, d_cache.v, d_span, sampling, gumbel)
    t_cache.commit(k)
    d_cache.commit(k)
    return out
