"""A lean Llama-style causal Transformer (RMSNorm, RoPE, SwiGLU, grouped-query attention).

One forward for every use: training (causal or any boolean mask), prefill and decode with a KV
cache, and K-Forcing passes that feed input vectors instead of token ids at chosen positions.
Projections are fused (qkv, gate+up) to keep per-step overhead low on small models; hf.py splits
them when converting to and from Hugging Face's layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kforcing.core.config import ModelConfig
from kforcing.core.device import compile_options
from kforcing.core.kv_cache import KVCache
from kforcing.core.tree import DraftTree
from kforcing.errors import KForcingError

# compiled passes attend over the filled cache slots rounded up to a multiple of this
SPAN_STEP = 32
# a compiled decode's caches are allocated in multiples of this many slots (fewer graph shapes)
CACHE_ROUND = 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        # low-precision activations: normalise in fp32 like Hugging Face Llama
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim) in the 'rotate half' layout Hugging Face Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 long-context RoPE: slow (long-wavelength) frequencies divided by `factor`, fast
    ones kept, a linear blend in between (measured in wavelengths of the original context)."""
    ctx = s["original_max_position_embeddings"]
    lo, hi, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    wavelen = 2 * math.pi / inv_freq
    blend = ((ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)   # 0: fully scaled, 1: kept
    return inv_freq / factor * (1 - blend) + inv_freq * blend


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos, sin (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, q_dim + 2 * kv_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(q_dim, cfg.dim, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> q (B, H, T, D), k, v (B, Hkv, T, D), RoPE applied to q and k."""
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)
        qk = apply_rope(qkv[:, :H + Hkv], cos, sin)       # rotate q and k in one go
        return qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
        """q (B, H, T, D) over k, v (B, Hkv, S, D) -> the output projection (B, T, dim)."""
        B, _, T, _ = q.shape
        # dropout acts on the residual stream only: attention-probability dropout would force
        # SDPA's slow math path on CPU (2x slower training).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def attend_each(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """Like attend, for the last T of S slots, but each query alone over exactly the slots
        it may see (the first S - T + i + 1): the kernel call a one-token step makes, so a
        query's result does not depend on how many tokens share the pass (see Transformer)."""
        B, _, T, _ = q.shape
        S = k.shape[2]
        gqa = self.n_kv_head != self.n_head
        ys = []
        for i in range(T):
            n = S - T + i + 1
            m = None if mask is None else mask[..., i:i + 1, :n]
            ys.append(F.scaled_dot_product_attention(q[:, :, i:i + 1], k[:, :, :n], v[:, :, :n],
                                                     attn_mask=m, enable_gqa=gqa))
        y = torch.cat(ys, 2)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def attend_tree(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, cache: KVCache, tree: DraftTree,
                    per_query: bool) -> torch.Tensor:
        """A draft tree's N nodes (q, k, v over them, (B, H(kv), N, D)): their K/V go to the
        node slots [L + R, L + R + N) (KVCache.accept_path commits the verified path from
        there). per_query: each node attends alone over the prefix [0, L) and its path, the keys
        and the kernel call of the AR step at that position. Every path lives in a lane of its
        own (KVCache.lane_buffers: the row's prefix, then the path, as AR's cache holds them),
        and a row's nodes of one level are one batched call over strided views of their lanes.
        The SDPA kernel treats batch rows independently; tests/test_tree.py checks the bits."""
        L, R, N = cache.length, tree.levels, tree.size
        ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
        ck[:, :, L + R:L + R + N] = k
        cv[:, :, L + R:L + R + N] = v
        if not per_query:
            return self.attend(q, ck[:, :, :L + R + N], cv[:, :, :L + R + N], mask)
        B, H, _, D = q.shape
        gqa, y = self.n_kv_head != self.n_head, torch.empty_like(q)
        lanes = cache.lane_buffers(self.layer_idx, tree.leaves)        # (B, P, Hkv, M, D) each
        sel = tree.leaf_paths(k.device)                                            # (P, R)
        for lane, new in zip(lanes, (k, v), strict=True):  # lane i: leaf i's path after the prefix
            lane[:, :, :, L:L + R] = new[:, :, sel].transpose(1, 2)
        for d in range(R):
            ids = tree.level(d)
            n = len(ids)
            for b in range(B):    # a row's nodes of the level in one call over views of its lanes
                # the leaves below node j of the level are lanes [j * span, (j + 1) * span): each
                # holds node j's path at slots L..L + d
                kv = [lane[b, ::tree.leaves // n, :, :L + d + 1] for lane in lanes]
                m = None if mask is None else mask[b % mask.shape[0], None, ..., :L + d + 1]
                out = F.scaled_dot_product_attention(
                    q[b, :, ids.start:ids.stop].transpose(0, 1)[:, :, None], *kv,
                    attn_mask=None if m is None else m.expand(n, *m.shape[1:]), enable_gqa=gqa)
                y[b, :, ids.start:ids.stop] = out[:, :, 0].transpose(0, 1)
        return self.wo(y.transpose(1, 2).reshape(B, N, -1))

    def step_static(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                    slots: torch.Tensor, span: int) -> torch.Tensor:
        """Transformer.decode_static's attention: the tokens' K/V go to `slots` of the layer's
        whole cache buffers (B, Hkv, M, D); they attend over the first `span` through `mask`."""
        q, k, v = self.project(x, cos, sin)
        k_buf[:, :, slots] = k
        v_buf[:, :, slots] = v
        return self.attend(q, k_buf[:, :, :span], v_buf[:, :, :span], mask)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None, store: bool = True,
                per_query: bool = False, tree: DraftTree | None = None) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        if tree is not None:
            return self.attend_tree(q, k, v, mask, cache, tree, per_query)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v, store)                       # (B, Hkv, S, D)
            if per_query and x.shape[1] > 1:
                return self.attend_each(q, k, v, mask)
        # No mask and no cache means plain causal training; with a cache and T == 1 the new
        # token sees every cached slot, so no mask is needed either
        return self.attend(q, k, v, mask, is_causal=mask is None and cache is None
                           and x.shape[1] > 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, cache, store=True, per_query=False, tree=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, store, per_query,
                                    tree))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def step_static(self, x, cos, sin, mask, k_buf, v_buf, slots, span):
        x = x + self.attn.step_static(self.attn_norm(x), cos, sin, mask, k_buf, v_buf, slots,
                                      span)
        return x + self.mlp(self.mlp_norm(x))


def static_stack(layers: nn.ModuleList, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 slots: torch.Tensor, valid: torch.Tensor, ks: list[torch.Tensor],
                 vs: list[torch.Tensor], span: int) -> torch.Tensor:
    """x (B, T, D) through `layers` (Block.step_static) over whole cache buffers ks, vs, as
    Transformer.decode_static runs its own: the T tokens' K/V go to `slots`, and token i
    attends over the first `span` slots, those <= slots[i] that `valid` (B, M) keeps."""
    seen = torch.arange(span, device=x.device)[None] <= slots[:, None]        # (T, span)
    mask = (seen[None] & valid[:, None, :span])[:, None]                    # (B, 1, T, span)
    for layer, k_buf, v_buf in zip(layers, ks, vs, strict=True):
        x = layer.step_static(x, *rope, mask, k_buf, v_buf, slots, span)
    return x


def static_slots(cache: KVCache, T: int) -> tuple[torch.Tensor, int]:
    """The slots (T,) a static pass of T tokens writes next in `cache`, and the span it attends
    over: the filled slots rounded up to SPAN_STEP (over the whole buffer, a batch-64 step spent
    1.7x as long in attention as the eager one), so the span changes in coarse steps."""
    cache.check_room(T)
    slots = torch.arange(cache.length, cache.length + T, device=cache.device)
    return slots, min(cache.max_len, -(-(cache.length + T) // SPAN_STEP) * SPAN_STEP)


def causal_mask(T: int, past: int = 0, valid: torch.Tensor | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, past + T): query i (slot past + i) sees slots <= past + i.

    valid (B, past + T) removes padding slots; a query always sees itself so no row is empty.
    """
    q_slot = torch.arange(past, past + T, device=device)[:, None]
    k_slot = torch.arange(past + T, device=device)[None, :]
    mask = k_slot <= q_slot                                                  # (T, S)
    if valid is None:
        return mask[None, None]
    return (mask[None] & valid[:, None, :]) | (k_slot == q_slot)[None]      # (B, T, S)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False   # training-time switch, not part of the config
        self.compiled_step = None      # compile_decode()
        self.apply(self._init_weights)
        # scaled init of the residual projections (GPT-2 / nanoGPT)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def rope(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, D) at positions (B, T); a clear error past the context."""
        if input_pos.numel() and int(input_pos.max()) >= self.config.max_seq_len:
            raise KForcingError(
                f"position {int(input_pos.max())} exceeds the model's context of "
                f"{self.config.max_seq_len} tokens")
        return self.static_rope(input_pos)

    def forward(self, idx: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, commit: int | None = None,
                last_only: bool = False, return_hidden: bool = False,
                per_query: bool = False, tree: DraftTree | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with last_only, or final hidden states with return_hidden.

        idx (B, T) token ids, or embeds (B, T, dim) input vectors (K-Forcing noise tokens).
        input_pos (B, T) or (T,) RoPE positions; default: the next slots after the cache.
        mask bool (B or 1, 1 or H, T, S), True = attend, S = cached slots + T.
        With a cache, all T tokens' K/V are written but only the first `commit` (default T)
        are kept; commit=0 writes nothing at all (the pass only reads the cache).

        per_query (with a cache): each of the T tokens attends alone over the slots it may see,
        exactly as T one-token steps would. Every other op of a block acts row by row, so where
        the matmul kernels are batch-invariant (measured: bf16 on CPU for up to 32 rows, see
        docs/METHOD.md section 9) the pass then gives bit for bit the logits of T steps: what
        lossless verification needs to reproduce AR sampling exactly.

        tree (with a cache): idx holds a draft tree's N nodes (core.tree), each attending to the
        cache and its own ancestors; nothing is committed: KVCache.accept_path keeps the path the
        caller verifies. With per_query each node repeats the AR step of its path exactly.
        """
        x = self.tok_embeddings(idx) if embeds is None else embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(T if tree is None else T + tree.levels)
        if input_pos is None:
            input_pos = torch.arange(past, past + T, device=x.device)
        if input_pos.dim() == 1:
            input_pos = input_pos.unsqueeze(0).expand(B, T)
        cos, sin = self.rope(input_pos)
        if tree is not None:
            if cache is None or tree.size != T:
                raise KForcingError(f"a tree pass needs a cache and the tree's {tree.size} nodes")
            valid = cache.valid if cache.has_padding else None
            if not per_query:
                mask = tree.mask(past, valid)
            elif valid is not None:   # per query: the prefix's padding; path slots are valid
                mask = valid[:, None, None, :past + tree.levels]
        # per_query over an unpadded cache: each query slices its own slots, as a step would
        elif mask is None and cache is not None and (cache.has_padding
                                                     or (T > 1 and not per_query)):
            valid = cache.valid[:, :past + T] if cache.has_padding else None
            mask = causal_mask(T, past, valid, device=x.device)
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)
        x = self.drop(x)
        store = commit != 0
        for layer in self.layers:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # recompute the block's activations in backward: memory O(1 block) per layer
                x = checkpoint(layer, x, cos, sin, mask, cache, store, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, store, per_query, tree)
        if cache is not None and tree is None:
            cache.commit(T if commit is None else commit)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.output(x)

    def decode_static(self, idx: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                      valid: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                      span: int, hidden: bool = False) -> torch.Tensor:
        """A cached pass with static shapes, what compile_decode compiles: tokens idx (B, T) at
        RoPE positions pos (B, T) -> logits (B, T, V), or with hidden the final (normed) hidden
        states (B, T, D). Their K/V go to cache slots `slots` ((T,) long, consecutive) of every
        layer's whole buffers ks, vs (KVCache.k, .v: (B, Hkv, M, D) each), and token i attends
        over the first `span` slots (span > slots[-1]), those <= slots[i] that valid (B, M)
        keeps (KVCache.valid). Only span varies with the cache's length, in coarse steps
        (compiled_pass), so one graph with a dynamic span serves every step. compiled_pass calls
        it on a KVCache."""
        x = static_stack(self.layers, self.tok_embeddings(idx), self.static_rope(pos), slots,
                         valid, ks, vs, span)
        x = self.norm(x)
        return x if hidden else self.output(x)

    def static_rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rope() without its range check (a host sync): for the compiled graphs, whose
        callers check positions up front."""
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

    def compiled_pass(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, *,
                      hidden: bool = False) -> torch.Tensor:
        """forward(idx, input_pos=pos, cache=cache[, return_hidden=True]) through the compiled
        graph (compile_decode first): all T tokens are committed. Positions must lie inside
        the context (the decoders check prompts and lengths up front)."""
        T = idx.shape[1]
        slots, span = static_slots(cache, T)
        out = self.compiled_step(idx, pos, slots, cache.valid, cache.k, cache.v, span, hidden)
        cache.commit(T)
        return out

    def compile_decode(self, **options) -> Transformer:
        """Opt in to compiled decode passes: decode_static as one torch.compile graph (CPU:
        inductor with frozen weights and a C++ wrapper, core.device.compile_options, needs a
        C++ compiler; options go to torch.compile, e.g.
        mode="reduce-overhead" for CUDA graphs). AR decoding (decoding/ar.py) and K-Forcing
        mode's teacher passes (decoding/feedback.py) then go through compiled_pass; lossless
        verification stays eager. The first pass compiles (tens of seconds, measured in
        docs/RESULTS.md); a new batch size, cache size or pass length compiles once more with
        dynamic shapes. Fused kernels round differently from eager ones, so a sampled token can
        differ in a near-tie from eager decoding. Call it after the final .to(): the graph holds
        the weights as they are then. Returns self."""
        options.setdefault("options", compile_options(self.output.weight.device))
        self.compiled_step = torch.compile(self.decode_static, fullgraph=True, **options)
        return self
