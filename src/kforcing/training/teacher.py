"""Teacher pretraining: AdamW, warmup + cosine, clipping, accumulation, optional bf16 autocast,
periodic validation, tqdm, JSONL metrics, atomic resumable checkpoints.

Resuming restores model, optimizer, RNG and data-loader state, so on a CPU a resumed run
reproduces the uninterrupted run's losses exactly. Under torchrun it trains data-parallel
(training/distributed.py, docs/DISTRIBUTED.md): each rank reads its shard of every global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kforcing.core.config import ModelConfig, TrainConfig, from_dict, load_json
from kforcing.core.model import Transformer
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    atomic_save_tensors,
    atomic_write_json,
    load_state,
    load_tensors,
    save_model,
)
from kforcing.io.tokenizers import eos_id, load_tokenizer
from kforcing.io.tokens import BlockLoader, TokenFile
from kforcing.training import distributed
from kforcing.training.rundir import (
    TRAINER_JSON,
    TRAINER_TENSORS,
    Progress,
    RunDir,
    check_corpus,
    check_same_config,
    interrupted,
    load_optimizer_tensors,
    optimizer_tensors,
    stop_signals,
)

# fields a resumed run may change: its budget, its cadence, where it runs
RESUMABLE = {"out_dir", "max_steps", "time_budget_min", "eval_every", "eval_batches",
             "ckpt_every", "keep_checkpoints", "device", "threads"}


def warmup_steps(cfg: TrainConfig) -> int:
    """cfg.warmup_steps, or a tenth of the run when the warmup would not fit in it (a smoke run
    `--max-steps 3` with the default warmup still warms up, then decays)."""
    return cfg.warmup_steps if cfg.warmup_steps < cfg.max_steps else cfg.max_steps // 10


def lr_at(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps.

    With a time budget, `time_fraction` (elapsed / budget) can move the decay forward, so a run
    that the clock stops early still ends at min_lr rather than mid-schedule.
    """
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    progress = min(1.0, max(progress, time_fraction))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # no weight decay on norms (1-D parameters), as in nanoGPT / Llama recipes
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def evaluate_loss(model: Transformer, token_file: TokenFile, block_size: int, batch_size: int,
                  max_batches: int | None = None, device: str = "cpu") -> float:
    """Mean next-token cross-entropy over sequential blocks of a token file."""
    loader = BlockLoader(token_file, block_size=block_size, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in loader.iter_eval(max_batches):
            logits = model(x.to(device))
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
            total += loss.item()
            count += y.numel()
    model.train(was_training)
    if count == 0:
        raise KForcingError("evaluation split is empty")
    return total / count


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.progress = progress
        # pre-flight: everything knowable before the first step is checked here
        data = Path(cfg.data)
        self.train_tokens, self.val_tokens = check_corpus(data, cfg.block_size)
        self.tokenizer_file = data / TOKENIZER_FILE
        tok = load_tokenizer(self.tokenizer_file)
        vocab = tok.get_vocab_size()
        overrides = {"vocab_size": vocab, "eos_id": eos_id(tok), **cfg.model_overrides}
        self.model_cfg = ModelConfig.preset(cfg.model, **overrides)
        if cfg.block_size > self.model_cfg.max_seq_len:
            raise KForcingError(f"block_size {cfg.block_size} exceeds the model context "
                                f"{self.model_cfg.max_seq_len}")
        self.ctx, self.device = distributed.setup(cfg.device)
        if self.ctx.world > 1:
            distributed.shard(range(cfg.batch_size))      # the global batch splits evenly
        self.run = RunDir(self.out, keep=cfg.keep_checkpoints, main=self.ctx.main)
        self.run.start(resume)
        distributed.barrier()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model = Transformer(self.model_cfg).to(self.device)
        self.ddp = distributed.wrap(self.model, self.device)   # the model itself on one rank
        self.opt = make_optimizer(self.model, cfg)
        self.loader = BlockLoader(self.train_tokens, block_size=cfg.block_size,
                                  batch_size=cfg.batch_size, seed=cfg.seed,
                                  shard=distributed.shard if self.ctx.world > 1 else None)
        self.step = 0
        self.elapsed = 0.0    # training seconds accumulated over all sessions of this run
        self.metrics = self.run.metrics
        if resume:
            self._resume()

    # checkpoints ----------------------------------------------------------------------------
    def _write_checkpoint(self, d: Path) -> None:
        extra = {"train": asdict(self.cfg), "step": self.step, "world_size": self.ctx.world}
        save_model(self.model, d, tokenizer=self.tokenizer_file, extra=extra)
        tensors, opt_meta = optimizer_tensors(self.opt)
        tensors.update({distributed.rng_key(r): s for r, s in enumerate(self._rng)})
        atomic_save_tensors(d / TRAINER_TENSORS, tensors)
        atomic_write_json(d / TRAINER_JSON, {"step": self.step, "elapsed": self.elapsed,
                                             "loader": self.loader.state_dict(),
                                             "optimizer": opt_meta})

    def save(self) -> Path:
        """Every rank calls it (for its RNG state); rank 0 writes, the others wait for it."""
        self._rng = distributed.gather_rng()
        path = self.run.publish(self.step, self._write_checkpoint)
        distributed.barrier()
        return path

    @staticmethod
    def _read(d: Path) -> dict:
        """Every file of a checkpoint, read (and so checked) before any of it is applied."""
        ckpt = {"config": load_json(d / CONFIG_FILE), "weights": load_tensors(d / MODEL_FILE),
                "tensors": load_tensors(d / TRAINER_TENSORS), "state": load_json(d / TRAINER_JSON)}
        missing = [k for k in ("train",) if k not in ckpt["config"]] + \
            [k for k in ("step", "elapsed", "loader", "optimizer") if k not in ckpt["state"]] + \
            [k for k in ("rng.torch",) if k not in ckpt["tensors"]]
        if missing:
            raise KForcingError(f"incomplete checkpoint {d}: no {', '.join(missing)}")
        return ckpt

    def _resume(self) -> None:
        found = self.run.resume(self._read)
        if found is None:
            return
        d, ckpt = found
        saved = asdict(from_dict(TrainConfig, ckpt["config"]["train"]))
        now = asdict(self.cfg)
        saved["data"], now["data"] = (str(Path(c["data"]).resolve()) for c in (saved, now))
        check_same_config(saved, now, RESUMABLE)
        load_state(self.model, ckpt["weights"], d / MODEL_FILE)
        load_optimizer_tensors(self.opt, ckpt["tensors"], ckpt["state"]["optimizer"])
        rng = distributed.rng_key(self.ctx.rank)
        if rng not in ckpt["tensors"]:
            raise KForcingError(f"cannot resume: checkpoint {d} was written by fewer than "
                                f"{self.ctx.world} processes (no {rng}); resume with as many")
        torch.set_rng_state(ckpt["tensors"][rng])
        self.loader.load_state_dict(ckpt["state"]["loader"])
        self.step, self.elapsed = ckpt["state"]["step"], ckpt["state"]["elapsed"]
        self.metrics.rewind(self.step)

    def log(self, record: dict) -> None:
        self.metrics.append(record)

    # training -------------------------------------------------------------------------------
    def time_fraction(self) -> float:
        budget = self.cfg.time_budget_min
        return self.elapsed / (budget * 60) if budget else 0.0

    def train_step(self) -> float:
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg, self.time_fraction())
        for group in self.opt.param_groups:
            group["lr"] = lr
        autocast = (torch.autocast(device_type=torch.device(self.device).type,
                                   dtype=torch.bfloat16)
                    if cfg.bf16 else contextlib.nullcontext())
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.loader.next_batch()            # this rank's shard: (B / world, T)
            x, y = x.to(self.device), y.to(self.device)
            # DDP averages gradients over ranks on the last micro-batch only
            with distributed.no_sync(self.ddp, sync=micro == cfg.grad_accum - 1):
                with autocast:
                    logits = self.ddp(x)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                         y.flatten())
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return distributed.mean(total)

    def validate(self) -> float:
        return evaluate_loss(self.model, self.val_tokens, self.cfg.block_size,
                             self.cfg.batch_size, self.cfg.eval_batches, self.device)

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to max_steps (or time budget, or `stop_after` more steps); returns last metrics.
        SIGINT / SIGTERM save a checkpoint, then raise KeyboardInterrupt."""
        cfg = self.cfg
        self.model.train()
        budget = cfg.time_budget_min * 60 if cfg.time_budget_min else None
        target = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
        last: dict = {}
        bar = Progress("train", max_steps=target, budget_min=cfg.time_budget_min, step=self.step,
                       minutes=self.elapsed / 60, enabled=self.progress and self.ctx.main)
        with stop_signals() as stop:
            t_last = time.perf_counter()
            while self.step < target:
                if budget is not None and self.elapsed >= budget:
                    break
                loss = self.train_step()
                lr = self.opt.param_groups[0]["lr"]
                now = time.perf_counter()
                # the slowest rank's clock, so every rank stops at the same step
                self.elapsed = distributed.maximum(self.elapsed + now - t_last)
                t_last = now
                last = {"step": self.step, "loss": loss, "lr": lr,
                        "elapsed_s": round(self.elapsed, 3),
                        "tokens_per_s": round(tokens_per_step * self.step /
                                              max(self.elapsed, 1e-9), 1)}
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    val = self.validate()
                    last.update(val_loss=val, val_ppl=math.exp(val))
                    t_last = time.perf_counter()   # validation time is not training time
                self.log(last)
                bar.update(self.step, self.elapsed / 60, loss=f"{loss:.3f}",
                           **({"val_ppl": f"{last['val_ppl']:.1f}"} if "val_ppl" in last else {}))
                stopping = distributed.maximum(float(bool(stop))) > 0   # one rank's signal
                if self.step % cfg.ckpt_every == 0 or stopping:
                    self.save()
                    t_last = time.perf_counter()
                if stopping:
                    bar.close()
                    raise interrupted(stop, self.step, self.out)
            bar.close()
            if "val_loss" not in last and last:
                val = self.validate()
                last.update(val_loss=val, val_ppl=math.exp(val))
                self.log({**last, "final": True})
            self.save()
        return last


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    return Trainer(cfg, resume=resume, progress=progress).fit()
