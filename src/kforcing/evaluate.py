"""Fidelity of a K-Forcing student to its teacher (METHOD.md section 7): on held-out contexts,
with the same uniforms, how often the student's window equals the teacher's exact AR rollout
G(context, u_1..u_k) — first token, whole window (joint) and per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kforcing.data import TokenFile
from kforcing.errors import KForcingError


@dataclass
class MatchSet:
    x: torch.Tensor                                   # (C, N) held-out contexts
    anchors: torch.Tensor                             # (M,) window anchors in every context
    u: torch.Tensor                                   # (C, M, k) uniforms
    targets: dict[float, torch.Tensor]                # tau -> (C, M, k) exact AR rollouts


@torch.no_grad()
def build_match_set(teacher, tokens: TokenFile, *, k: int, block_size: int, n_windows: int,
                    taus: list[float], order: str, seed: int = 0, per_context: int = 8,
                    device: str | torch.device = "cpu", chunk: int = 32) -> MatchSet:
    """n_windows windows: the last `per_context` positions of randomly drawn held-out blocks."""
    from kforcing.distill import ar_rollout

    g = torch.Generator().manual_seed(10_000 + seed)
    n_blocks = tokens.num_blocks(block_size)
    if n_blocks == 0:
        raise KForcingError("held-out split is shorter than one block")
    idx = torch.randperm(n_blocks, generator=g)[:max(1, n_windows // per_context)]
    x = torch.stack([torch.from_numpy(tokens.block(int(i), block_size)[:-1])
                     for i in idx]).to(device)
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
