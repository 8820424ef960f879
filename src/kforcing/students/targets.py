"""Training targets of a K-Forcing stage, made by the AR teacher (docs/METHOD.md, section 4).

- `teacher_conditionals`: the teacher's logits along known tokens of many windows, one pass;
- `ar_rollout`: exact k-step AR samples G(x<=t, u_1..u_k) (the reference map at any k);
- `invert_noise`: real data tokens as targets, with uniforms drawn inside each token's CDF
  interval under the teacher (so InvCDF(p, u) gives the data token back).

Temperatures are per row (tau (B,)); the tempered distribution and its CDF come from
`kforcing.core.sampling`, the one primitive every decoder also samples with.
"""

from __future__ import annotations

import torch

from kforcing.core.masks import staircase
from kforcing.core.sampling import SamplingConfig, inverse_cdf, probs_from_logits

_PLAIN = SamplingConfig()     # temperature 1, no filters: tau is applied per row before


def tempered_probs(logits: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """logits (B, ..., V), tau (B,) -> probabilities (B, ..., V) of logits / tau, float32."""
    t = tau.reshape(-1, *([1] * (logits.dim() - 1))).float()
    return probs_from_logits(logits.float() / t, _PLAIN)


def cdf_interval(probs: torch.Tensor, token: torch.Tensor, order: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (..., V), token (...) -> (lo, hi) (...) float64, normalised to [0, 1]: the uniforms
    u in [lo, hi) for which inverse_cdf(probs, u, order) returns token."""
    if order == "sorted":
        # the order inverse_cdf uses: decreasing probability, ties by id (a stable sort)
        probs, perm = torch.sort(probs, dim=-1, descending=True, stable=True)
        token = torch.argsort(perm, -1).gather(-1, token[..., None]).squeeze(-1)
    cdf = probs.double().cumsum(-1)
    hi = cdf.gather(-1, token[..., None]).squeeze(-1)
    lo = hi - probs.double().gather(-1, token[..., None]).squeeze(-1)
    total = cdf[..., -1]
    return lo / total, hi / total


@torch.no_grad()
def teacher_conditionals(teacher, x: torch.Tensor, known: torch.Tensor, anchors: torch.Tensor
                         ) -> torch.Tensor:
    """Teacher logits p(. | x<=t, y_<i) for i = 1..j+1 along known tokens y (B, M, j), for
    each anchor t, in one staircase pass: (B, M, j+1, V)."""
    B, N = x.shape
    M, j = anchors.numel(), known.shape[-1]
    st = staircase(N, j, anchors, device=x.device)
    logits = teacher(torch.cat([x, known.flatten(1, 2)], 1), input_pos=st.positions,
                     mask=st.mask[None, None])
    first = logits[:, anchors].unsqueeze(2)                                  # (B, M, 1, V)
    return torch.cat([first, logits[:, N:].view(B, M, j, logits.shape[-1])], dim=2)


@torch.no_grad()
def ar_rollout(teacher, x: torch.Tensor, u: torch.Tensor, tau: torch.Tensor, anchors: torch.Tensor,
               order: str) -> torch.Tensor:
    """Exact k-step AR samples G(x<=t, u_1..u_k) for each anchor: (B, M, k) tokens.

    x (B, N), u (B, M, k), tau (B,), anchors (M,). Step j runs the teacher once over
    [context | windows of the j-1 tokens drawn so far]."""
    B = x.shape[0]
    ys = torch.empty(B, anchors.numel(), 0, dtype=torch.long, device=x.device)
    for j in range(u.shape[-1]):
        logits = teacher_conditionals(teacher, x, ys, anchors)[:, :, -1]     # (B, M, V)
        y = inverse_cdf(tempered_probs(logits, tau), u[..., j], order)      # (B, M)
        ys = torch.cat([ys, y[..., None]], dim=2)
    return ys


@torch.no_grad()
def invert_noise(teacher, x: torch.Tensor, tau: torch.Tensor, anchors: torch.Tensor, k: int,
                 order: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Data tokens x[t+1..t+k] as targets and uniforms inside their CDF intervals: (u, y), both
    (B, M, k) (u float64)."""
    B, N = x.shape
    probs = tempered_probs(teacher(x), tau)                                 # (B, N, V)
    idx = anchors[:, None] + torch.arange(k, device=x.device)               # (M, k)
    y = x[:, (idx + 1).clamp(max=N - 1)]                                     # (B, M, k)
    lo, hi = cdf_interval(probs[:, idx], y, order)                          # (B, M, k)
    r = torch.rand(y.shape, generator=generator, dtype=torch.float64).to(x.device)
    u = (lo + r * (hi - lo)).clamp(0.0, 1.0 - 1e-12)
    return u, y
