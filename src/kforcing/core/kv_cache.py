"""A preallocated key/value cache shared by every decoder (AR, K-Forcing, lossless).

Slots are filled left to right and shared by all rows of the batch; each row has its own RoPE
positions (so ragged prompts can be left-padded) and a validity mask for padding slots. Each layer
has its own K and V tensors (k[layer], v[layer]): a compiled decode step (decoding/static.py) then
writes one slot of a graph input in place instead of copying a buffer shared by every layer.

The protocol that K-Forcing relies on: a forward pass writes the K/V of all its T tokens at slots
[length, length + T) and attends over [0, length + T); only the first `commit` of them become part
of the cache. The rest (noise tokens) sit in scratch slots that the next pass overwrites, so they
never influence later tokens. `truncate` rolls the cache back (lossless mode rejects tokens).
"""

from __future__ import annotations

import torch

from kforcing.errors import KForcingError


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.max_len = max_len
        self._lanes: dict[int, list] = {}     # lane_buffers(): layer -> [K, V, slots in step]
        self.length = 0

    @property
    def length(self) -> int:
        """Slots filled: [0, length) are the cache, later slots scratch."""
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        self._length = n
        for lane in self._lanes.values():    # slots from n on may be rewritten: copy them again
            lane[2] = min(lane[2], n)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = model.config
        p = next(model.parameters())
        max_len = max_len or cfg.max_seq_len
        return cls(cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_dim, max_len,
                   device=p.device, dtype=p.dtype)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise KForcingError(
                f"KV cache full: {self.length} cached + {T} new tokens > capacity {self.max_len}")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, store: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at the next T slots; return K, V over [0, length + T).

        store=False leaves the cache untouched and concatenates instead: a pass whose tokens are
        all dropped (K-Forcing noise tokens) can then backpropagate into k, v during training.
        """
        L, T = self.length, k.shape[2]
        if not store:
            return (torch.cat([self.k[layer][:, :, :L], k], dim=2),
                    torch.cat([self.v[layer][:, :, :L], v], dim=2))
        self.k[layer][:, :, L:L + T] = k
        self.v[layer][:, :, L:L + T] = v
        return self.k[layer][:, :, :L + T], self.v[layer][:, :, :L + T]

    def mark_padding(self, valid: torch.Tensor) -> None:
        """valid (B, T): False for padding among the next T slots (call before the pass)."""
        L, T = self.length, valid.shape[1]
        self.valid[:, L:L + T] = valid
        self.has_padding = self.has_padding or not bool(valid.all())

    def commit(self, n: int) -> None:
        self.length += n

    def accept_path(self, path: torch.Tensor, kept: torch.Tensor, same: int | None) -> None:
        """After a draft-tree pass (Transformer.forward's tree, whose N node K/V sit at slots
        length + R + node): commit each row's path. path (B, R) node ids root..deepest accepted
        (padded), kept (B,) how many of them the row keeps. Where every row keeps `same`, the
        cache simply grows by it (AR's layout); otherwise by R with the rest masked out."""
        L, R = self.length, path.shape[1]
        src = (L + R + path)[:, None, :, None]                            # (B, 1, R, 1)
        for buf in (*self.k, *self.v):
            buf[:, :, L:L + R] = buf.gather(2, src.expand(-1, buf.shape[1], -1, buf.shape[3]))
        if same is not None:
            self.length = L + same
            self.valid[:, L:] = True
        else:
            self.valid[:, L:L + R] = torch.arange(R, device=kept.device)[None] < kept[:, None]
            self.valid[:, L + R:] = True
            self.length = L + R
            self.has_padding = True

    def lane_buffers(self, layer: int, lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (B, lanes, H_kv, max_len, D) of `layer` in which every lane's first `length`
        slots hold its row's cache: what a draft tree's exact (per-query) verification attends
        over (Attention.attend_tree puts each path right after the prefix in its own lane).
        Allocated at the first call; afterwards only the slots filled since the last call are
        copied."""
        lane = self._lanes.get(layer)
        if lane is None or lane[0].shape[1] != lanes:
            B, *rest = self.k[layer].shape
            lane = self._lanes[layer] = [self.k[layer].new_empty(B, lanes, *rest),
                                         self.v[layer].new_empty(B, lanes, *rest), 0]
        start, L = lane[2], self.length
        if start < L:
            for buf, src in ((lane[0], self.k[layer]), (lane[1], self.v[layer])):
                buf[:, :, :, start:L] = src[:, None, :, start:L]
            lane[2] = L
        return lane[0], lane[1]

    def truncate(self, length: int) -> None:
        """Roll back to `length` slots; later slots become scratch again."""
        if not 0 <= length <= self.length:
            raise KForcingError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
        self.valid[:, length:] = True

    def reset(self) -> None:
        self.truncate(0)
        self.has_padding = False
