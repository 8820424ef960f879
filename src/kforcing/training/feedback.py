"""Training the token-feedback draft (docs/METHOD.md section 9), sample-efficient by design.

- stage k=1, teacher-forced, from the teacher cache (feedback_cache.py): the draft reads
  (f_t, embedding of x_{t+1}) and predicts q for x_{t+2}: soft cross-entropy to the teacher's
  distribution at a temperature tau ~ U[tau_min, tau_max] (1/tau applied to the cached
  log-probabilities), plus a regression of the draft's output to f_{t+1} (EAGLE).
- self-forcing stages k = 2, 4, 8: from corpus contexts, at M anchors per context, the chain
  is rolled out as decoding sees it: y_1 sampled from the teacher, then the draft's own
  features and sampled tokens. Targets are the teacher's conditionals along those tokens,
  from one batched teacher pass over [context, y_1..y_{k-1}] (no grad); loss at every chain
  position.

In-run validation (every few CPU-minutes) measures window match under the student's own
coupling on held-out windows, logged with the process CPU time of training, so curves are per
CPU-minute. Checkpoints are atomic and a resumed run continues exactly.

Under torchrun (training/distributed.py, docs/DISTRIBUTED.md) the draft trains in DDP: each rank
takes its slice of every global batch (the random draws are made for the whole batch and
sliced, so N ranks compute what one process would), runs the teacher on its rows only,
validates its part of the held-out windows, and rank 0 alone writes. CPU time is summed over
ranks: the budget and the curves count the CPU the whole job spent.

On an accelerator (`device`; rank r of a torchrun job on cuda:LOCAL_RANK) the models and every
tensor the losses and validation make live there; the teacher cache stays in host memory, one
batch moved at a time; random draws stay on CPU generators (the same on every device), moved.
The clock there is wall time (the slowest rank's): the host mostly waits on the device.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kforcing.core.config import from_dict, load_json
from kforcing.core.device import check_device
from kforcing.core.kv_cache import KVCache
from kforcing.core.noise import NoiseStream
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.feedback import WindowMatch, summarize_matches, window_match
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import (
    atomic_save_tensors,
    atomic_write_json,
    load_model,
    load_tensors,
    resolve_model_dir,
)
from kforcing.io.tokens import TokenFile
from kforcing.students.feedback import (
    FeedbackConfig,
    FeedbackStudent,
    GrowingKV,
    load_feedback,
    resolve_feedback_dir,
    save_feedback,
)
from kforcing.training import distributed
from kforcing.training.feedback_cache import load_teacher_cache
from kforcing.training.rundir import (
    TRAINER_JSON,
    TRAINER_TENSORS,
    MetricsLog,
    Progress,
    load_optimizer_tensors,
    optimizer_tensors,
    publish_checkpoint,
)


@dataclass
class FeedbackTrainConfig:
    teacher: str = ""
    data: str = ""                     # prepared corpus (train.bin, validation.bin)
    out_dir: str = "runs/fb"
    k: int = 1                         # 1: teacher-forced stage; 2, 4, 8: self-forcing chain
    cache: str | None = None           # teacher cache directory (stage k=1)
    init: str | None = None            # the previous stage's run or checkpoint
    student: FeedbackConfig = field(default_factory=FeedbackConfig)
    batch_size: int = 16
    context: int = 128                 # self-forcing context length
    anchors: int = 16                  # chains per self-forcing context
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    reg_weight: float = 1.0            # feature regression (EAGLE) next to the soft CE
    max_steps: int = 100000
    time_budget_min: float | None = None   # CPU minutes of training (wall minutes off CPU)
    eval_every_min: float = 3.0        # CPU minutes between validations (wall off CPU)
    eval_windows: int = 256
    eval_context: int = 128
    eval_k: int = 4
    eval_taus: tuple[float, ...] = (1.0, 0.7)
    ckpt_every: int = 100
    bf16: bool = False                 # bf16 autocast for the teacher's no-grad passes
    draft_bf16: bool = False           # bf16 autocast for the draft's forward (weights stay fp32)
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"                # checked by the trainer (core/device.py)

    def __post_init__(self) -> None:
        if isinstance(self.student, dict):
            self.student = from_dict(FeedbackConfig, self.student)
        self.eval_taus = tuple(self.eval_taus)
        if self.k not in (1, 2, 4, 8) or self.k > self.student.max_k:
            raise KForcingError(f"stage k must be 1, 2, 4 or 8 and <= max_k="
                                f"{self.student.max_k}, got {self.k}")
        if self.k == 1 and not self.cache:
            raise KForcingError("stage k=1 trains from a teacher cache: give cache=...")
        if not 1 <= self.anchors < self.context:
            raise KForcingError(f"anchors must be in [1, context), got {self.anchors}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise KForcingError("need 0 <= min_lr <= lr and lr > 0")
        if self.eval_k > self.student.max_k:
            raise KForcingError(f"eval_k={self.eval_k} exceeds max_k={self.student.max_k}")


# -- losses ---------------------------------------------------------------------------------------

def soft_ce_top(q_logits: torch.Tensor, top_lp: torch.Tensor, top_ids: torch.Tensor,
                tau: torch.Tensor, vocab_size: int, id_map: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Cross-entropy of q at tau to a teacher known by its top-N log-probabilities (..., N) at
    tau 1, plus one tail bucket holding the rest of its mass (at tau != 1 the tail is taken as
    spread evenly over the other V - N tokens). q_logits (..., Vq) are over the full vocabulary,
    or over a draft vocabulary with id_map (V,) giving each token's column (-1: q cannot produce
    it; such targets are left out). tau broadcasts against (...). Returns (...)."""
    N = top_lp.shape[-1]
    t = tau.unsqueeze(-1)
    a = top_lp.float() / t
    cols = top_ids.long() if id_map is None else id_map[top_ids.long()]
    ok = cols >= 0
    z = q_logits.float() / t
    logq_top = z.gather(-1, cols.clamp(min=0)) - torch.logsumexp(z, -1, keepdim=True)
    ce = -torch.where(ok, logq_top, 0.0)
    if vocab_size == N:
        return (a.softmax(-1) * ce).sum(-1)
    tail_mass = (1 - top_lp.float().exp().sum(-1)).clamp(min=1e-9)
    tail = (tail_mass.log() - math.log(vocab_size - N)) / t[..., 0] + math.log(vocab_size - N)
    logz = torch.logsumexp(torch.cat([a, tail.unsqueeze(-1)], -1), -1, keepdim=True)
    q_rest = 1 - torch.where(ok, logq_top.exp(), 0.0).sum(-1)
    p_top = torch.where(ok, (a - logz).exp(), 0.0)
    return (p_top * ce).sum(-1) - (tail - logz[..., 0]).exp() * q_rest.clamp(min=1e-6).log()


def soft_ce_dense(q_logits: torch.Tensor, p_logits: torch.Tensor, tau: torch.Tensor,
                  draft_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of q (..., Vq) to the teacher's full distribution p (..., V), both at tau;
    with a draft vocabulary q covers only draft_ids (the mass of p elsewhere is left out)."""
    t = tau.unsqueeze(-1)
    p = (p_logits.float() / t).softmax(-1)
    if draft_ids is not None:
        p = p[..., draft_ids]
    return -(p * (q_logits.float() / t).log_softmax(-1)).sum(-1)


def gumbel_sample(logits: torch.Tensor, tau: torch.Tensor, gen: torch.Generator,
                  rows: slice | None = None, batch: int | None = None) -> torch.Tensor:
    """An exact sample of softmax(logits / tau) (..., V) from the generator's noise: (...).
    With rows, logits (b, ..., V) are those rows of a batch of `batch` (one rank's shard): the
    noise of the whole batch is drawn and these rows kept, as one process would draw them."""
    shape = logits.shape if rows is None else (batch, *logits.shape[1:])
    u = torch.rand(shape, generator=gen)
    u = (u if rows is None else u[rows]).clamp_(1e-12, 1 - 1e-7).to(logits.device)
    return (logits.float() / tau.unsqueeze(-1) - torch.log(-torch.log(u))).argmax(-1)


def frequent_ids(tokens: TokenFile, n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent token ids of a token file (ties by id), sorted by id."""
    counts = np.bincount(np.asarray(tokens.tokens, dtype=np.int64), minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))[:n]
    return torch.from_numpy(np.sort(order))


def eval_contexts(tokens: TokenFile, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """n held-out contexts (n, length) at seeded random offsets of a token file."""
    if len(tokens) <= length:
        raise KForcingError(f"{tokens.path} has {len(tokens)} tokens, too few for contexts of "
                            f"{length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length, (n,), generator=g).tolist()
    return torch.stack([torch.from_numpy(tokens.tokens[s:s + length].astype(np.int64))
                        for s in starts])


def window_matches(student: FeedbackStudent, contexts: torch.Tensor, *, k: int, tau: float,
                   seed: int = 0, chunk: int = 64, coupling: str | None = None
                   ) -> list[WindowMatch]:
    """window_match on held-out contexts (n, C) at tau, in chunks; row i uses NoiseStream
    seed seed + i. The matches are returned in host memory (ranks gather them)."""
    device = student.teacher.tok_embeddings.weight.device
    s = SamplingConfig(temperature=float(tau), coupling=coupling or student.config.coupling)
    out = [window_match(student, contexts[i:i + chunk].to(device), k, s,
                        NoiseStream.from_seed(seed + i, min(chunk, len(contexts) - i), device))
           for i in range(0, len(contexts), chunk)]
    return [WindowMatch(m.tokens.cpu(), m.teacher.cpu(), m.overlap2.cpu()) for m in out]


def evaluate_feedback(student: FeedbackStudent, contexts: torch.Tensor, *, k: int,
                      taus=(1.0, 0.7), seed: int = 0, chunk: int = 64,
                      coupling: str | None = None) -> dict:
    """Window match on held-out contexts (n, C) under the student's coupling (or `coupling`),
    y_1 sampled, at each tau: {"tau=1.0": summarize_matches(...), ...}. Row i uses NoiseStream
    seed seed + i. In a multi-process run each rank evaluates its part of the rows and every
    rank returns the summary of all of them."""
    part = distributed.span(len(contexts))
    out = {}
    for tau in taus:
        mine = window_matches(student, contexts[part], k=k, tau=tau, seed=seed + part.start,
                              chunk=chunk, coupling=coupling)
        out[f"tau={tau}"] = summarize_matches([m for ms in distributed.gather(mine)
                                               for m in ms])
    return out


# -- the trainer ----------------------------------------------------------------------------------

class FeedbackTrainer:
    def __init__(self, cfg: FeedbackTrainConfig, *, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        self.ctx, self.device = distributed.setup(check_device(cfg.device))
        self.on_cpu = torch.device(self.device).type == "cpu"
        self.clock = time.process_time if self.on_cpu else time.perf_counter   # (seconds)
        rows = distributed.shard(range(cfg.batch_size), self.ctx)   # the batch splits evenly
        self.rows = slice(rows[0], rows[-1] + 1)     # this rank's rows of every global batch
        self.teacher_dir = resolve_model_dir(cfg.teacher)
        teacher = load_model(self.teacher_dir, device=self.device)
        data = Path(cfg.data)
        if not (data / "validation.bin").is_file():
            raise KForcingError(f"no prepared corpus in '{data}' (validation.bin missing)")
        self.base_cpu = 0.0          # CPU seconds spent before this stage (cache, earlier stages)
        if cfg.init:
            self.student = load_feedback(cfg.init, self.device, teacher=teacher)
            prev = load_json(resolve_feedback_dir(cfg.init) / TRAINER_JSON)
            self.base_cpu = prev.get("cum_cpu_s", 0.0)
            self.student.config = cfg.student = FeedbackConfig(
                **{**asdict(self.student.config), "max_k": cfg.student.max_k})
        else:
            torch.manual_seed(cfg.seed)
            ids = None
            if cfg.student.draft_vocab_size:
                ids = frequent_ids(TokenFile(data / "train.bin"), cfg.student.draft_vocab_size,
                                   teacher.config.vocab_size)
            self.student = FeedbackStudent(teacher, cfg.student, ids).to(self.device)
        self.teacher = teacher
        self.student.train()
        self.draft = distributed.wrap(distributed.Method(self.student, "draft"), self.device)
        self.id_map = None            # token id -> column of the draft vocabulary (-1: absent)
        if self.student.draft_ids is not None:
            ids = self.student.draft_ids
            self.id_map = torch.full((teacher.config.vocab_size,), -1, dtype=torch.long,
                                     device=self.device)
            self.id_map[ids] = torch.arange(ids.numel(), device=self.device)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        if cfg.k == 1:
            spec, self.cached, cache_cpu = load_teacher_cache(cfg.cache)
            if Path(spec.teacher).resolve() != self.teacher_dir.resolve():
                raise KForcingError(f"the teacher cache {cfg.cache} was built from "
                                    f"{spec.teacher}, not {self.teacher_dir}")
            self.base_cpu = self.base_cpu or cache_cpu
            self.n_windows = self.cached["tokens"].shape[0]
        else:
            self.train_tokens = TokenFile(data / "train.bin")
            self.n_windows = self.train_tokens.num_blocks(cfg.context)
        self.val = eval_contexts(TokenFile(data / "validation.bin"), cfg.eval_windows,
                                 cfg.eval_context, cfg.seed)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95),
                                     weight_decay=cfg.weight_decay)
        self.step, self.cpu_s, self.epoch, self.position = 0, 0.0, 0, 0
        self.metrics = MetricsLog(self.out / "metrics.jsonl", main=self.ctx.main)
        if resume:
            self._resume()
        elif (self.out / "checkpoints" / "latest.json").exists():
            raise KForcingError(f"{self.out} already holds a run: pass resume or another out")

    def autocast(self, draft: bool = False):
        on = self.cfg.draft_bf16 if draft else self.cfg.bf16
        return (torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16) if on
                else contextlib.nullcontext())

    def next_windows(self) -> torch.Tensor:
        """Window indices of the next batch: every window once per epoch, seeded order."""
        out: list[int] = []
        while len(out) < self.cfg.batch_size:
            order = torch.randperm(self.n_windows,
                                   generator=torch.Generator().manual_seed(self.cfg.seed
                                                                           + self.epoch))
            take = min(self.cfg.batch_size - len(out), self.n_windows - self.position)
            out += order[self.position:self.position + take].tolist()
            self.position += take
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return torch.tensor(out)

    def tau(self, B: int) -> torch.Tensor:
        lo, hi = self.student.config.tau_min, self.student.config.tau_max
        return (lo + (hi - lo) * torch.rand(B, generator=self.gen)).to(self.device)

    def mean(self, value: float) -> float:
        return distributed.mean(value, self.device)   # (nccl reduces device tensors only)

    # stage 1 ---------------------------------------------------------------------------------
    def teacher_forced_loss(self) -> tuple[torch.Tensor, dict]:
        idx = self.next_windows()[self.rows]                 # this rank's rows of the batch
        c = {f: v[idx].to(self.device, non_blocking=True) for f, v in self.cached.items()}
        x, f = c["tokens"].long(), c["feature"].float()
        T = x.shape[1]
        tau = self.tau(self.cfg.batch_size)[self.rows, None]
        with self.autocast(draft=True):
            h = self.draft(f[:, :-1], x[:, 1:], torch.arange(T - 1, device=self.device))
            q = self.student.draft_logits(h)                                   # (B, T-1, Vq)
        ce = soft_ce_top(q, c["top_lp"][:, 1:], c["top_ids"][:, 1:], tau,
                         self.student.vocab_size, self.id_map).mean()
        reg = F.smooth_l1_loss(h.float(), f[:, 1:])
        return ce + self.cfg.reg_weight * reg, {"ce": self.mean(ce.item()),
                                                "reg": self.mean(reg.item())}

    # self-forcing stages ---------------------------------------------------------------------
    def self_forcing_loss(self) -> tuple[torch.Tensor, dict]:
        cfg, student, teacher, dev = self.cfg, self.student, self.teacher, self.device
        k, C, M = cfg.k, cfg.context, cfg.anchors
        x = torch.stack([torch.from_numpy(self.train_tokens.block(int(i), C)[:-1])
                         for i in self.next_windows()[self.rows]]).to(dev)         # (B, C)
        B, rows = x.shape[0], (self.rows, cfg.batch_size)    # this rank's rows of the batch
        tau = self.tau(cfg.batch_size)[self.rows]
        anchors = (C // 4 + torch.randperm(C - C // 4, generator=self.gen)[:M]).sort()[0].to(dev)
        tcache = KVCache.for_model(teacher, B, max_len=C + M * (k - 1))
        with torch.no_grad(), self.autocast():
            f = teacher(x, cache=tcache, return_hidden=True).float()               # (B, C, D)
            y = gumbel_sample(teacher.output(f[:, anchors]), tau[:, None], self.gen,
                              *rows)                                               # (B, M)
        kv = GrowingKV(cfg.student.draft_layers)
        steps_q, steps_h, chain = [], [], [y]
        causal = torch.ones(C - 1, C - 1, dtype=torch.bool, device=dev).tril()[None, None]
        with self.autocast(draft=True):
            h_ctx = self.draft(f[:, :-1], x[:, 1:], torch.arange(C - 1, device=dev), cache=kv,
                               mask=causal)
            h, pos = f[:, anchors], anchors
            for i in range(k - 1):
                h = self.draft(h, chain[-1], pos + i, cache=kv,
                               mask=_chain_mask(C, anchors, i))
                q = student.draft_logits(h)
                steps_q.append(q)
                steps_h.append(h)
                if i < k - 2:   # the draft's own token, as decoding draws it
                    y = gumbel_sample(q.detach(), tau[:, None], self.gen, *rows)
                    chain.append(y if student.draft_ids is None else student.draft_ids[y])
        # targets: the teacher along [context, y_1..y_{k-1}] at every anchor, one pass
        toks = torch.cat(chain, 1)                                                 # (B, (k-1)M)
        tpos = torch.cat([anchors + 1 + i for i in range(k - 1)])
        tmask = torch.cat([torch.arange(C, device=dev)[None] <= anchors.repeat(k - 1)[:, None],
                           _chain_mask(0, anchors, k - 2)[0, 0]], 1)
        with torch.no_grad(), self.autocast():
            g = teacher(toks, input_pos=tpos, mask=tmask[None, None], cache=tcache,
                        return_hidden=True).float()                                # (B, (k-1)M, D)
            p = teacher.output(g)
        q = torch.cat(steps_q, 1)
        ce = soft_ce_dense(q, p, tau[:, None], student.draft_ids).view(B, k - 1, M).mean((0, 2))
        reg = F.smooth_l1_loss(torch.cat(steps_h, 1).float(), g) + \
            F.smooth_l1_loss(h_ctx.float(), f[:, 1:])
        return ce.mean() + cfg.reg_weight * reg, {
            "ce": [round(v, 4) for v in distributed.mean_tensor(ce.detach()).tolist()],
            "reg": self.mean(reg.item())}

    # bookkeeping -----------------------------------------------------------------------------
    def lr(self) -> float:
        cfg = self.cfg
        if self.step < cfg.warmup_steps:
            return cfg.lr * (self.step + 1) / cfg.warmup_steps
        frac = self.step / cfg.max_steps
        if cfg.time_budget_min:
            frac = max(frac, self.cpu_s / (60 * cfg.time_budget_min))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1, frac)))

    def validate(self) -> dict:
        self.student.eval()
        res = evaluate_feedback(self.student, self.val, k=self.cfg.eval_k,
                                taus=self.cfg.eval_taus, seed=self.cfg.seed)
        self.student.train()
        return res

    def record(self) -> dict:
        return {"step": self.step, "cpu_min": round(self.cpu_s / 60, 3),
                "cum_cpu_min": round((self.base_cpu + self.cpu_s) / 60, 3), "k": self.cfg.k}

    def _write(self, d: Path) -> None:
        save_feedback(self.student, d, self.teacher_dir,
                      extra={"k": self.cfg.k, "step": self.step,
                             "train": asdict(self.cfg)})
        tensors, meta = optimizer_tensors(self.opt)
        tensors["rng.gen"] = self.gen.get_state()       # the same on every rank
        tensors.update({distributed.rng_key(r): s for r, s in enumerate(self._rng)})
        atomic_save_tensors(d / TRAINER_TENSORS, tensors)
        atomic_write_json(d / TRAINER_JSON, {
            "step": self.step, "cpu_s": self.cpu_s, "cum_cpu_s": self.base_cpu + self.cpu_s,
            "base_cpu_s": self.base_cpu, "epoch": self.epoch, "position": self.position,
            "optimizer": meta})

    def save(self) -> Path | None:
        """Every rank calls it (for its RNG state); rank 0 writes, the others wait for it."""
        self._rng = distributed.gather_rng()
        with distributed.main_first() as main:
            return publish_checkpoint(self.out, self.step, self._write) if main else None

    def _resume(self) -> None:
        d = resolve_feedback_dir(self.out)
        resumed = load_feedback(d, self.device, teacher=self.teacher)
        self.student.load_state_dict(resumed.state_dict())
        state = load_json(d / TRAINER_JSON)
        tensors = load_tensors(d / TRAINER_TENSORS)
        load_optimizer_tensors(self.opt, tensors, state["optimizer"])
        self.gen.set_state(tensors["rng.gen"])
        rng = distributed.rng_key(self.ctx.rank)
        if rng in tensors:       # (absent from checkpoints older than the per-rank states)
            torch.set_rng_state(tensors[rng])
        elif self.ctx.world > 1:
            raise KForcingError(f"cannot resume: checkpoint {d} was written by fewer than "
                                f"{self.ctx.world} processes (no {rng}); resume with as many")
        self.step, self.cpu_s = state["step"], state["cpu_s"]
        self.base_cpu, self.epoch, self.position = (state["base_cpu_s"], state["epoch"],
                                                    state["position"])
        self.metrics.rewind(self.step)

    def fit(self, stop_after: int | None = None) -> dict:
        """Train until max_steps, the CPU budget, or `stop_after` more steps."""
        cfg = self.cfg
        budget = 60 * cfg.time_budget_min if cfg.time_budget_min else None
        target = cfg.max_steps if stop_after is None else min(cfg.max_steps,
                                                               self.step + stop_after)
        loss_fn = self.teacher_forced_loss if cfg.k == 1 else self.self_forcing_loss
        bar = Progress(f"feedback k={cfg.k}", max_steps=target, budget_min=cfg.time_budget_min,
                       step=self.step, minutes=self.cpu_s / 60,
                       enabled=self.progress and self.ctx.main)
        if self.step == 0:
            self.metrics.append({**self.record(), "val": self.validate()})
        last_eval = self.cpu_s
        while self.step < target and (budget is None or self.cpu_s < budget):
            t0 = self.clock()
            for group in self.opt.param_groups:
                group["lr"] = self.lr()
            loss, parts = loss_fn()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            loss_value = loss.item()    # (on an accelerator: once the step's queued work is done)
            # every rank's CPU (the slowest rank's wall time off CPU): the budget, the cadence
            # and the lr are the same on all ranks
            dt = self.clock() - t0
            self.cpu_s += (distributed.total(dt) if self.on_cpu
                           else distributed.maximum(dt, self.device))
            rec = {**self.record(), "loss": round(self.mean(loss_value), 4), **parts}
            if self.cpu_s - last_eval >= 60 * cfg.eval_every_min:
                rec["val"] = self.validate()
                last_eval = self.cpu_s
            self.metrics.append(rec)
            bar.update(self.step, self.cpu_s / 60, loss=f"{loss_value:.3f}")
            if self.step % cfg.ckpt_every == 0:
                self.save()
        bar.close()
        rec = {**self.record(), "val": self.validate(), "final": True}
        self.metrics.append(rec)
        self.save()
        return rec


def _chain_mask(C: int, anchors: torch.Tensor, i: int) -> torch.Tensor:
    """(1, 1, M, C-1 + (i+1)M) attention of chain step i (all M anchors) in a self-forcing pass:
    the draft's context entries j < anchor (C - 1 of them; none for C = 0), then steps 0..i of
    its own chain. With C = 0, i = k-2 it is also the chain part of the teacher's target mask
    (M rows per step, all steps)."""
    M, dev = anchors.numel(), anchors.device
    eye = torch.eye(M, dtype=torch.bool, device=dev)
    if C == 0:   # the teacher's target pass: rows (step s, anchor m) see (s' <= s, m)
        s = torch.arange(i + 1, device=dev)
        return ((s[:, None, None, None] >= s[None, None, :, None]) & eye[None, :, None, :]
                ).reshape(1, 1, (i + 1) * M, (i + 1) * M)
    ctx = torch.arange(C - 1, device=dev)[None] < anchors[:, None]
    return torch.cat([ctx] + [eye] * (i + 1), 1)[None, None]


def train_feedback(cfg: FeedbackTrainConfig, *, resume: bool = False, progress: bool = True
                   ) -> dict:
    return FeedbackTrainer(cfg, resume=resume, progress=progress).fit()
