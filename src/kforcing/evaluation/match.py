"""Fidelity of a K-Forcing student to its teacher on held-out contexts (docs/METHOD.md,
"Evaluation").

- match: how often the student's window equals the teacher's exact AR rollout G(context,
  u_1..u_k) for the same uniforms (first token, whole window, per position);
- first-token TV: distance between the student's push-forward distribution of its first token and
  the teacher's next-token distribution, Monte Carlo over uniforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kforcing.core.sampling import SamplingConfig, draw, probs_from_logits
from kforcing.errors import KForcingError
from kforcing.io.tokens import TokenFile
from kforcing.students.targets import ar_rollout, teacher_conditionals


@dataclass
class MatchSet:
    x: torch.Tensor                                   # (C, N) held-out contexts
    anchors: torch.Tensor                             # (M,) window anchors in every context
    u: torch.Tensor                                   # (C, M, k) uniforms
    targets: dict[float, torch.Tensor]                # tau -> (C, M, k) exact AR rollouts


def held_out_blocks(tokens: TokenFile, n: int, length: int, generator: torch.Generator
                    ) -> torch.Tensor:
    """Up to n distinct random blocks of `length` tokens from a split: (n', length), n' <= n."""
    n_blocks = tokens.num_blocks(length)
    if n_blocks == 0:
        raise KForcingError(f"held-out split {tokens.path} is shorter than one block of "
                            f"{length} tokens")
    idx = torch.randperm(n_blocks, generator=generator)[:n]
    return torch.stack([torch.from_numpy(tokens.block(int(i), length)[:-1]) for i in idx])


@torch.no_grad()
def build_match_set(teacher, tokens: TokenFile, *, k: int, block_size: int, n_windows: int,
                    taus: list[float], order: str, seed: int = 0, per_context: int = 8,
                    device: str | torch.device = "cpu", chunk: int = 32) -> MatchSet:
    """n_windows windows: the last `per_context` positions of randomly drawn held-out blocks."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = held_out_blocks(tokens, max(1, n_windows // per_context), block_size, g).to(device)
    C, N = x.shape
    anchors = torch.arange(N - per_context, N, device=device)
    u = torch.rand(C, per_context, k, generator=g, dtype=torch.float64).to(device)
    targets = {}
    for tau_v in sorted(set(taus)):
        tau = torch.full((C,), float(tau_v), dtype=torch.float64, device=device)
        targets[tau_v] = torch.cat([
            ar_rollout(teacher, x[s:s + chunk], u[s:s + chunk], tau[s:s + chunk], anchors, order)
            for s in range(0, C, chunk)])
    return MatchSet(x, anchors, u, targets)


@torch.no_grad()
def match_rates(student, mset: MatchSet, chunk: int = 32) -> dict:
    """{'tau1': {'first', 'joint', 'per_pos', 'windows'}, ...} for one student."""
    was_training = student.training
    student.eval()
    out = {}
    for tau_v, y in mset.targets.items():
        eqs = []
        for s in range(0, mset.x.shape[0], chunk):
            x = mset.x[s:s + chunk]
            tau = torch.full((x.shape[0],), float(tau_v), dtype=torch.float64, device=x.device)
            toks = student.staircase_forward(x, mset.u[s:s + chunk], tau, mset.anchors).tokens
            eqs.append(toks == y[s:s + chunk])
        eq = torch.cat(eqs)                                                 # (C, M, k)
        out[f"tau{tau_v:g}"] = {"first": float(eq[..., 0].float().mean()),
                                "joint": float(eq.all(-1).float().mean()),
                                "per_pos": [round(float(m), 4) for m in eq.float().mean((0, 1))],
                                "windows": int(eq.shape[0] * eq.shape[1])}
    student.train(was_training)
    return out


@torch.no_grad()
def first_token_tv(student, teacher, x: torch.Tensor, u: torch.Tensor, tau: float, *,
                   chunk: int = 256, progress: bool = False) -> dict:
    """TV distance between the student's first token and the teacher's next token after each
    context, averaged over contexts. x (C, N) contexts, u (C, S) uniforms (S draws per context).

    The teacher's distribution p enters exactly through its own inverse-CDF sampler T(u), which
    draws from p exactly: with Z_i(u) = 1[student(u) = i] - 1[T(u) = i], q_i - p_i = E[Z_i], so
    d_i = mean of Z_i over the S draws estimates q_i - p_i without bias, and the same uniforms
    make it a control variate (exactly 0 for a student that samples like the teacher). The plug-in
    0.5 sum |d_i| is biased upwards: 0 <= E[plug-in] - TV <= 0.5 sum sqrt(Var d_i), the
    `bias_bound` reported. Also reported: the standard error over contexts and the coupling
    bound TV <= P(student(u) != T(u)).
    """
    C, N = x.shape
    S = u.shape[1]
    cfg = SamplingConfig(temperature=float(tau), cdf_order=student.config.cdf_order)
    anchor = torch.tensor([N - 1], device=x.device)
    no_known = torch.zeros(C, 1, 0, dtype=torch.long, device=x.device)
    logits = teacher_conditionals(teacher, x, no_known, anchor)[:, 0, 0]      # (C, V)
    V = logits.shape[-1]
    probs = probs_from_logits(logits, cfg)                                    # (C, V)
    tau_c = torch.full((C,), float(tau), dtype=torch.float64, device=x.device)
    ours = torch.empty(C, S, dtype=torch.long, device=x.device)
    theirs = torch.empty_like(ours)
    # the first token of a window does not depend on the window's length: draw windows of 1
    steps = [(c, s) for c in range(C) for s in range(0, S, chunk)]
    for c, s in tqdm(steps, desc="first-token TV", disable=not progress, leave=False):
        uu = u[c:c + 1, s:s + chunk]                                        # (1, S')
        anchors = anchor.expand(uu.shape[1])
        ours[c, s:s + chunk] = student.staircase_forward(
            x[c:c + 1], uu[..., None], tau_c[c:c + 1], anchors).tokens[0, :, 0]
        theirs[c, s:s + chunk] = draw(probs[c].expand(uu.shape[1], V), uu[0], cfg)
    tv, bias, mismatch = [], [], []
    for c in range(C):
        q = torch.bincount(ours[c], minlength=V).double() / S
        p = torch.bincount(theirs[c], minlength=V).double() / S
        same = ours[c][ours[c] == theirs[c]]
        both = torch.bincount(same, minlength=V).double() / S
        d = q - p
        var = (q + p - 2 * both - d ** 2).clamp(min=0) * S / max(S - 1, 1)   # Var Z_i, unbiased
        tv.append(0.5 * float(d.abs().sum()))
        bias.append(0.5 * float((var / S).sqrt().sum()))
        mismatch.append(float((ours[c] != theirs[c]).double().mean()))
    tvs = torch.tensor(tv, dtype=torch.float64)
    se = float(tvs.std() / math.sqrt(C)) if C > 1 else None
    return {"first_token_tv": float(tvs.mean()), "first_token_tv_se": se,
            "first_token_tv_bias_bound": sum(bias) / C,
            "first_token_tv_coupling_bound": sum(mismatch) / C,
            "tv_contexts": C, "tv_draws": S}
