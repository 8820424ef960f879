"""The teacher cache of feedback-draft training (docs/METHOD.md section 9): the teacher's final
hidden states and a compact form of its next-token distributions on corpus windows, computed
once and read for many epochs (on a CPU the teacher forward is the expensive part).

Layout of a cache directory:
    manifest.json              the spec (teacher, token file, windows, sizes), then "complete"
    shard-00000.safetensors    per window w and position t of that shard:
        tokens   (S, T)    int32    the corpus window x_0..x_{T-1}
        feature  (S, T, D) float16  the teacher's final-normed hidden state at t
        top_lp   (S, T, N) float16  the N largest log-probabilities of p(. | x_<=t)
        top_ids  (S, T, N) int32    their token ids
Log-probabilities (logits minus their logsumexp) keep the tail mass known: 1 - sum(exp(top_lp)).

Shards are written atomically one by one; building again with the same spec skips the shards
already on disk, so a killed build resumes where it stopped and ends identical. Under torchrun
each rank computes its own shards (build_teacher_cache, docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kforcing.core.config import from_dict, load_json
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import atomic_save_tensors, atomic_write_json, load_tensors
from kforcing.io.tokens import TokenFile
from kforcing.training import distributed

MANIFEST = "manifest.json"
FIELDS = ("tokens", "feature", "top_lp", "top_ids")


@dataclass
class CacheSpec:
    teacher: str                 # resolved teacher directory
    tokens: str                  # resolved token file (train split)
    block_size: int = 256        # T positions per window
    top_n: int = 128
    windows: int = 2048          # corpus blocks drawn (without replacement, seeded)
    shard_windows: int = 64
    seed: int = 0
    bf16: bool = False           # teacher forward under bf16 autocast

    def __post_init__(self) -> None:
        for name in ("block_size", "top_n", "windows", "shard_windows"):
            if getattr(self, name) < 1:
                raise KForcingError(f"teacher cache: {name} must be positive, got "
                                    f"{getattr(self, name)}")

    @property
    def num_shards(self) -> int:
        return -(-self.windows // self.shard_windows)


def shard_path(out: Path, i: int) -> Path:
    return Path(out) / f"shard-{i:05d}.safetensors"


def window_ids(tokens: TokenFile, spec: CacheSpec) -> torch.Tensor:
    """The corpus blocks a cache holds, in shard order (a seeded sample without replacement)."""
    n = tokens.num_blocks(spec.block_size)
    if spec.windows > n:
        raise KForcingError(f"teacher cache: {spec.windows} windows asked, the token file has "
                            f"only {n} blocks of {spec.block_size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))[:spec.windows]


@torch.inference_mode()
def teacher_targets(teacher: Transformer, x: torch.Tensor, top_n: int, bf16: bool = False
                    ) -> dict[str, torch.Tensor]:
    """x (S, T) -> the cache fields for these windows (see the module docstring), on the CPU
    whatever the teacher's device."""
    ctx = (torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if bf16
           else contextlib.nullcontext())
    with ctx:
        h = teacher(x, return_hidden=True)
        logits = teacher.output(h)
    lp, ids = logits.float().log_softmax(-1).topk(min(top_n, logits.shape[-1]), dim=-1)
    return {"tokens": x.to("cpu", torch.int32), "feature": h.to("cpu", torch.float16),
            "top_lp": lp.to("cpu", torch.float16), "top_ids": ids.to("cpu", torch.int32)}


def build_teacher_cache(teacher: Transformer, spec: CacheSpec, out: str | Path, *,
                        batch_size: int = 16, progress: bool = True,
                        stop_after_shards: int | None = None) -> Path:
    """Write (or finish writing) a teacher cache; returns its directory. stop_after_shards
    writes at most that many new shards (per rank) and returns (what a killed build leaves).

    Under torchrun (training/distributed.py) rank r of N computes the shards i with
    i % N == r, so each shard is computed once; rank 0 marks the manifest complete when every
    rank is done, and the files are those a one-process build writes. The manifest's cpu_s
    sums the ranks' CPU seconds (a killed multi-process build keeps only the earlier runs').
    A CUDA teacher is moved to this rank's GPU (cuda:LOCAL_RANK); shards are saved from
    host memory."""
    out = Path(out)
    ctx, device = distributed.setup(str(teacher.tok_embeddings.weight.device))
    teacher.to(device)
    manifest = out / MANIFEST
    old = load_json(manifest) if manifest.is_file() else None
    distributed.barrier()        # every rank has read the manifest before rank 0 rewrites it
    if old is not None:
        if old.get("spec") != asdict(spec):
            raise KForcingError(f"{out} holds a teacher cache with another spec: choose another "
                                "directory or delete it")
        if old.get("complete"):
            return out
    elif ctx.main:
        atomic_write_json(manifest, {"spec": asdict(spec), "complete": False})
    tokens = TokenFile(spec.tokens)
    ids = window_ids(tokens, spec)
    mine = range(ctx.rank, spec.num_shards, ctx.world)
    todo = [i for i in mine if not shard_path(out, i).is_file()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="teacher cache",
               unit="shard", disable=not (progress and ctx.main), dynamic_ncols=True)
    prior = (old or {}).get("cpu_s", 0.0)
    cpu, stopped = 0.0, False
    for written, i in enumerate(todo):
        if stop_after_shards is not None and written >= stop_after_shards:
            stopped = True
            break
        t0 = time.process_time()
        block = ids[i * spec.shard_windows:(i + 1) * spec.shard_windows]
        x = torch.stack([torch.from_numpy(tokens.block(int(b), spec.block_size)[:-1])
                         for b in block]).to(device)
        parts = [teacher_targets(teacher, x[s:s + batch_size], spec.top_n, spec.bf16)
                 for s in range(0, x.shape[0], batch_size)]
        atomic_save_tensors(shard_path(out, i), {f: torch.cat([p[f] for p in parts])
                                                 for f in FIELDS})
        cpu += time.process_time() - t0
        if ctx.world == 1:       # a killed build keeps the CPU time it spent
            atomic_write_json(manifest, {"spec": asdict(spec), "complete": False,
                                         "cpu_s": prior + cpu})
        bar.update(1)
    bar.close()
    cpu = prior + distributed.total(cpu, device)      # (nccl reduces device tensors only)
    complete = distributed.maximum(float(stopped), device) == 0
    with distributed.main_first() as main:       # the others wait until the manifest is final
        if main:
            atomic_write_json(manifest, {"spec": asdict(spec), "complete": complete,
                                         "cpu_s": cpu})
    return out


def load_teacher_cache(path: str | Path) -> tuple[CacheSpec, dict[str, torch.Tensor], float]:
    """A complete cache in memory: (spec, fields concatenated over shards, CPU seconds it took
    to build)."""
    path = Path(path)
    meta = load_json(path / MANIFEST)
    if not meta.get("complete"):
        raise KForcingError(f"the teacher cache in {path} is incomplete: build it again to "
                            "finish it")
    spec = from_dict(CacheSpec, meta["spec"])
    shards = [load_tensors(shard_path(path, i)) for i in range(spec.num_shards)]
    for i, s in enumerate(shards):
        if set(s) != set(FIELDS):
            raise KForcingError(f"corrupt teacher cache shard {shard_path(path, i)}")
    return spec, {f: torch.cat([s[f] for s in shards]) for f in FIELDS}, meta.get("cpu_s", 0.0)
