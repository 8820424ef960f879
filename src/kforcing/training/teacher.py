"""Teacher pretraining: AdamW, warmup + cosine, clipping, accumulation, optional bf16 autocast,
periodic validation, tqdm, JSONL metrics, atomic resumable checkpoints.

Resuming restores model, optimizer, RNG and data-loader state, so on a CPU a resumed run
reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kforcing.io.checkpoint import (
    MODEL_FILE,
    TOKENIZER_FILE,
    MetricsLog,
    atomic_save_tensors,
    atomic_write_json,
    load_state,
    load_tensors,
    publish_checkpoint,
    resolve_model_dir,
    save_model,
)
from kforcing.core.config import ModelConfig, TrainConfig, from_dict, load_json
from kforcing.io.data import BlockLoader, TokenFile, eos_id, load_tokenizer
from kforcing.errors import KForcingError
from kforcing.core.model import Transformer

TRAINER_TENSORS, TRAINER_JSON = "trainer.safetensors", "trainer.json"


def lr_at(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps.

    With a time budget, `time_fraction` (elapsed / budget) can move the decay forward, so a run
    that the clock stops early still ends at min_lr rather than mid-schedule.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
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


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors (safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
    for name, val in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
        data = Path(cfg.data)
        if not (data / "train.bin").is_file():
            raise KForcingError(f"no prepared corpus in '{data}': run `kforcing data prepare` "
                                "first (it writes train.bin, validation.bin, tokenizer.json)")
        self.tokenizer_file = data / TOKENIZER_FILE
        tok = load_tokenizer(self.tokenizer_file)
        self.train_tokens = TokenFile(data / "train.bin")
        self.val_tokens = TokenFile(data / "validation.bin")
        vocab = tok.get_vocab_size()
        overrides = {"vocab_size": vocab, "eos_id": eos_id(tok), **cfg.model_overrides}
        self.model_cfg = ModelConfig.preset(cfg.model, **overrides)
        if cfg.block_size > self.model_cfg.max_seq_len:
            raise KForcingError(f"block_size {cfg.block_size} exceeds the model context "
                                f"{self.model_cfg.max_seq_len}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model = Transformer(self.model_cfg).to(cfg.device)
        self.opt = make_optimizer(self.model, cfg)
        self.loader = BlockLoader(self.train_tokens, block_size=cfg.block_size,
                                  batch_size=cfg.batch_size, seed=cfg.seed)
        self.step = 0
        self.elapsed = 0.0    # training seconds accumulated over all sessions of this run
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        if resume:
            self._resume()
        elif (self.out / "checkpoints" / "latest.json").exists():
            raise KForcingError(f"{self.out} already holds a run: pass --resume to continue it "
                                "or choose another --out")

    # checkpoints ----------------------------------------------------------------------------
    def _write_checkpoint(self, d: Path) -> None:
        extra = {"train": asdict(self.cfg), "step": self.step}
        save_model(self.model, d, tokenizer=self.tokenizer_file, extra=extra)
        tensors, opt_meta = optimizer_tensors(self.opt)
        tensors["rng.torch"] = torch.get_rng_state()
        atomic_save_tensors(d / TRAINER_TENSORS, tensors)
        atomic_write_json(d / TRAINER_JSON, {"step": self.step, "elapsed": self.elapsed,
                                             "loader": self.loader.state_dict(),
                                             "optimizer": opt_meta})

    def save(self) -> Path:
        return publish_checkpoint(self.out, self.step, self._write_checkpoint,
                                  keep=self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        d = resolve_model_dir(self.out)
        state = load_json(d / TRAINER_JSON)
        saved = from_dict(TrainConfig, load_json(d / "config.json")["train"])
        for key in ("model", "block_size", "batch_size", "grad_accum", "seed", "data"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise KForcingError(f"cannot resume: {key} was {getattr(saved, key)!r}, now "
                                    f"{getattr(self.cfg, key)!r}")
        load_state(self.model, load_tensors(d / MODEL_FILE), d / MODEL_FILE)
        tensors = load_tensors(d / TRAINER_TENSORS)
        load_optimizer_tensors(self.opt, tensors, state["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.elapsed = state["step"], state["elapsed"]
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
        autocast = (torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)
                    if cfg.bf16 else contextlib.nullcontext())
        total = 0.0
        for _ in range(cfg.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(cfg.device), y.to(cfg.device)
            with autocast:
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def validate(self) -> float:
        return evaluate_loss(self.model, self.val_tokens, self.cfg.block_size,
                             self.cfg.batch_size, self.cfg.eval_batches, self.cfg.device)

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to max_steps (or time budget, or `stop_after` more steps); returns last metrics."""
        cfg = self.cfg
        self.model.train()
        budget = cfg.time_budget_min * 60 if cfg.time_budget_min else None
        target = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
        last: dict = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress,
                   desc="train", unit="step", dynamic_ncols=True)
        t_last = time.perf_counter()
        while self.step < target:
            if budget is not None and self.elapsed >= budget:
                break
            loss = self.train_step()
            lr = self.opt.param_groups[0]["lr"]
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            last = {"step": self.step, "loss": loss, "lr": lr,
                    "elapsed_s": round(self.elapsed, 3),
                    "tokens_per_s": round(tokens_per_step * self.step / max(self.elapsed, 1e-9),
                                          1)}
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                val = self.validate()
                last.update(val_loss=val, val_ppl=math.exp(val))
                t_last = time.perf_counter()   # validation time is not training time
            self.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", **({"val_ppl": f"{last['val_ppl']:.1f}"}
                                                    if "val_ppl" in last else {}))
            if self.step % cfg.ckpt_every == 0:
                self.save()
                t_last = time.perf_counter()
        bar.close()
        if "val_loss" not in last and last:
            val = self.validate()
            last.update(val_loss=val, val_ppl=math.exp(val))
            self.log({**last, "final": True})
        self.save()
        return last


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    return Trainer(cfg, resume=resume, progress=progress).fit()
