"""Attention masks for K-Forcing, written once and shared by training and decoding.

Sequence layout of a staircase pass: N context tokens, then one window of `w` tokens for each
chosen context index t (window order = order of `anchors`). Inside a window everything is
causal; a window sees the context up to and including its anchor t and nothing of other windows.

- training staircase (docs/METHOD.md section 3): window = k noise tokens;
- two-level staircase (section 4): window = k' known tokens followed by k' noise tokens, i.e.
  the same mask with w = 2k' (the known tokens simply come in as token embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Staircase:
    mask: torch.Tensor        # (S, S) bool, True = attend; S = N + len(anchors) * w
    positions: torch.Tensor   # (S,) RoPE positions: context j -> j; window slot i -> t + 1 + i
    n_context: int
    window: int


def staircase(n_context: int, window: int, anchors: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> Staircase:
    """anchors (M,) context indices that get a window (default: every position 0..N-1)."""
    if anchors is None:
        anchors = torch.arange(n_context, device=device)
    anchors = anchors.to(device)
    M, N, w = anchors.numel(), n_context, window
    S = N + M * w
    idx = torch.arange(S, device=device)
    is_ctx = idx < N
    w_ = max(w, 1)                                                  # w = 0: context only
    win = torch.where(is_ctx, -1, (idx - N) // w_)                  # window id or -1
    slot = torch.where(is_ctx, 0, (idx - N) % w_)                   # slot inside the window
    anchor = torch.where(is_ctx, idx, anchors[win.clamp(min=0)])    # context index seen up to
    q_ctx, k_ctx = is_ctx[:, None], is_ctx[None, :]
    ctx_causal = k_ctx & (idx[None, :] <= anchor[:, None])          # context keys <= anchor
    same_win = (~q_ctx) & (~k_ctx) & (win[:, None] == win[None, :])
    same_win &= slot[None, :] <= slot[:, None]                       # causal inside a window
    mask = ctx_causal | same_win
    positions = torch.where(is_ctx, idx, anchor + 1 + slot)
    return Staircase(mask=mask, positions=positions, n_context=N, window=w)
