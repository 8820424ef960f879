"""A static draft tree for lossless verification (docs/METHOD.md section 9, "Draft trees").

A window's root is y_1, the teacher's own next token. Depth d holds candidates for y_{d+1}:
every node of depth d - 1 has widths[d - 1] children, the draft's top-`width` tokens under the
Gumbel noise of that token index. One teacher pass reads every node; each node attends to the
cache and to its own ancestors only, so its logits are those of the chain root -> node. The
teacher's token after a node verifies that node's children; at most one child can match (the
candidates of a node are distinct), so the accepted nodes form one chain from the root.

Nodes are numbered breadth-first (root 0). Widths (1, 1, ..., 1) are the plain chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from kforcing.errors import KForcingError

MAX_TREE_NODES = 64


def parse_widths(text: str | None, k: int) -> tuple[int, ...]:
    """'4,2,1' -> (4, 2, 1) for k = 4 (k - 1 widths); None or '' -> the chain (1,) * (k - 1)."""
    if not text:
        return (1,) * (k - 1)
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise KForcingError(f"--tree takes comma-separated widths like '4,2,1', got '{text}'"
                            ) from None
    if len(widths) != k - 1:
        raise KForcingError(f"--tree needs k - 1 = {k - 1} widths (one per drafted token), "
                            f"got {len(widths)} in '{text}'")
    return widths


@dataclass(frozen=True)
class DraftTree:
    widths: tuple[int, ...]
    parent: tuple[int, ...] = field(init=False)    # (N,) parent node, -1 for the root
    depth: tuple[int, ...] = field(init=False)     # (N,)

    def __post_init__(self) -> None:
        if any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise KForcingError(f"tree widths must be positive integers, got {self.widths}")
        parent, depth, level = [-1], [0], [0]
        for d, w in enumerate(self.widths, start=1):
            nxt = []
            for p in level:
                for _ in range(w):
                    nxt.append(len(parent))
                    parent.append(p)
                    depth.append(d)
            level = nxt
        if len(parent) > MAX_TREE_NODES:
            raise KForcingError(f"a draft tree of widths {self.widths} has {len(parent)} nodes; "
                                f"at most {MAX_TREE_NODES} are supported")
        object.__setattr__(self, "parent", tuple(parent))
        object.__setattr__(self, "depth", tuple(depth))

    @property
    def size(self) -> int:
        """N: the nodes the teacher reads in one pass (root included)."""
        return len(self.parent)

    @property
    def leaves(self) -> int:
        """The nodes at the deepest level: one path per leaf."""
        return self.depth.count(len(self.widths))

    @property
    def levels(self) -> int:
        """R = k: the depths 0..k-1, so a window commits at most R tokens."""
        return len(self.widths) + 1

    @property
    def is_chain(self) -> bool:
        return all(w == 1 for w in self.widths)

    def level(self, d: int) -> range:
        """The node ids at depth d (contiguous: breadth-first numbering)."""
        first = self.depth.index(d)
        return range(first, first + self.depth.count(d))

    @cached_property
    def paths(self) -> torch.Tensor:
        """(N, R) long: the nodes root..node along each node's path, padded with the node."""
        out = torch.empty(self.size, self.levels, dtype=torch.long)
        for i in range(self.size):
            path, j = [], i
            while j >= 0:
                path.append(j)
                j = self.parent[j]
            path = path[::-1]
            out[i] = torch.tensor(path + [i] * (self.levels - len(path)))
        return out

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(paths (N, R), depth (N,)) on `device`, made once per device: a pass reads them in
        every layer, a decoder in every window."""
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.paths.to(device), torch.tensor(self.depth, device=device))
        return self._on[key]

    def leaf_paths(self, device: torch.device | str) -> torch.Tensor:
        """(leaves, R) long on `device`: each leaf's path, root first. The leaves below a node
        of depth d with n nodes are leaves / n consecutive ones (breadth-first numbering)."""
        key = (str(device), "leaves")
        if key not in self._on:
            self._on[key] = self.paths[self.level(len(self.widths)).start:].to(device)
        return self._on[key]

    @cached_property
    def _on(self) -> dict:
        return {}

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """(N, N) bool: node i may attend to node j (j on i's path, i itself included)."""
        n = self.size
        anc = torch.zeros(n, n, dtype=torch.bool)
        rows = torch.arange(n)[:, None].expand(n, self.levels)
        anc[rows, self.paths] = True
        return anc

    def mask(self, past: int, valid: torch.Tensor | None) -> torch.Tensor:
        """Attention mask (B or 1, 1, N, past + R + N) for a pass whose nodes sit at slots
        past + R + i (slots [past, past + R) hold the committed path later): the cache's valid
        prefix, then each node's ancestors."""
        n, R = self.size, self.levels
        anc = self.ancestors.to(valid.device if valid is not None else "cpu")
        prefix = (valid[:, :past] if valid is not None
                  else torch.ones(1, past, dtype=torch.bool, device=anc.device))
        B = prefix.shape[0]
        gap = torch.zeros(B, n, R, dtype=torch.bool, device=anc.device)
        return torch.cat([prefix[:, None].expand(B, n, past), gap, anc[None].expand(B, n, n)],
                         2)[:, None]

    def accept(self, tokens: torch.Tensor, teacher: Callable[[int, torch.Tensor], torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Walk down from the root: teacher(d, node (B,)) is the teacher's token after each row's
        node at depth d; the child holding it (at most one: a node's candidates are distinct)
        is confirmed and the walk goes on from there. tokens (B, N) the nodes' tokens ->
        (deepest confirmed node (B,), the teacher's token after each node of its path (B, R),
        padded with the last). Only the nodes on the paths are asked, one per row and depth,
        until every row's path has ended."""
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device)
        node = torch.zeros(B, dtype=torch.long, device=tokens.device)
        alive = torch.ones(B, dtype=torch.bool, device=tokens.device)
        after = []
        for d in range(self.levels):
            t = teacher(d, node)                                                 # (B,)
            after.append(torch.where(alive, t, after[-1]) if after else t)
            if d == len(self.widths):
                break
            w, lv, nxt = self.widths[d], self.level(d), self.level(d + 1)
            kids = nxt.start + (node - lv.start)[:, None] * w + torch.arange(w, device=node.device)
            hit = tokens[rows[:, None], kids] == t[:, None]                      # (B, w)
            alive &= hit.any(1)
            node = torch.where(alive, kids[rows, hit.long().argmax(1)], node)
            if not bool(alive.any()):           # every row's path has ended
                break
        after += after[-1:] * (self.levels - len(after))
        return node, torch.stack(after, 1)
