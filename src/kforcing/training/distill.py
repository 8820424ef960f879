"""Progressive distillation of an AR teacher into a K-Forcing student (docs/METHOD.md section 4).

One call = one stage: a student with window k learns, from targets made by `target`, to emit
in one pass the k tokens the reference map produces from the same uniforms:
- `self-forcing` (the paper): stage 1 uses the AR teacher's InvCDF tokens; stage 2k' runs the
  frozen stage-k' student twice (two-level staircase);
- `ar-rollout`: exact k-step AR rollouts of the teacher, k teacher passes per batch;
- `noise-inversion`: real data tokens, with u drawn inside each data token's CDF interval under
  the teacher (one teacher pass gives targets for any k).
Each stage logs JSONL metrics and a validation learning curve (match rates vs training minutes:
CPU-minutes of this process on a CPU, wall-clock on an accelerator, validation excluded)
and writes atomic, resumable checkpoints. Under torchrun it trains data-parallel
(training/distributed.py, docs/DISTRIBUTED.md): each rank makes the targets of its own shard.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kforcing.core.config import check_types, from_dict, load_json
from kforcing.errors import KForcingError
from kforcing.evaluation.match import MatchSet, build_match_set, match_rates
from kforcing.io.checkpoint import (
    TOKENIZER_FILE,
    atomic_save_tensors,
    atomic_write_json,
    load_model,
    load_state,
    load_tensors,
    resolve_model_dir,
)
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import BlockLoader, TokenFile
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import (
    STUDENT_FILE,
    STUDENT_JSON,
    load_student,
    save_student,
    student_info,
)
from kforcing.students.targets import (
    ar_rollout,
    invert_noise,
    teacher_conditionals,
    tempered_probs,
)
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
from kforcing.training.selfdata import teacher_corpus

TARGETS = ("self-forcing", "ar-rollout", "noise-inversion")
# fields a resumed stage may change: its budget, its cadence, where it runs
RESUMABLE = {"out_dir", "max_steps", "time_budget_min", "eval_every_min", "ckpt_every", "device"}
# what a stage started with --init takes from its init student unless a flag overrides it
INHERITED = ("layout", "head", "cdf_order", "noise_min_freq", "noise_max_freq", "noise_blocks")


@dataclass
class DistillConfig:
    teacher: str = ""               # teacher model or run directory
    data: str = ""                  # prepared corpus directory
    out_dir: str = "runs/student-k1"
    k: int = 1                      # window of this stage
    init: str | None = None         # previous stage's student directory (None: from teacher)
    student: StudentConfig = field(default_factory=StudentConfig)
    target: str = "self-forcing"
    # tau ~ U[tau_min, tau_max] per sequence; [0.7, 1] beat tau = 1 in the screening
    # (docs/EXPERIMENTS.md: first-token match 26.4% vs 19.9% at tau 1, 39.5% vs 22.7% at tau 0.7)
    tau_min: float = 0.7
    tau_max: float = 1.0
    tau_start: float | None = None  # curriculum: the range's top ramps up from here to tau_max
    tau_ramp: float = 0.5           # ... over this fraction of the budget (time or steps)
    block_size: int = 64            # context length N of each training sequence
    windows: int = 64               # anchors M per sequence that get a window
    batch_size: int = 16
    lr: float = 5e-4                # copied backbone
    noise_lr: float = 2e-3          # new modules (noise encoder)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    max_steps: int = 100_000
    time_budget_min: float | None = 10.0   # CPU minutes of training (wall minutes off CPU)
    pos_weights: list[float] | None = None   # per-position loss weights (default all 1)
    eval_every_min: float = 1.0
    eval_contexts: int = 64
    ckpt_every: int = 100
    seed: int = 0
    device: str = "cpu"
    # small hardware (docs/TEACHERS.md has the measured costs)
    data_free: bool = False         # no corpus: contexts are the teacher's own samples (cached)
    data_free_tokens: int = 65_536  # ... this many tokens of them (+1/16 held out)
    train_last_blocks: int | None = None   # train only the last N backbone blocks (+ noise)
    grad_checkpoint: bool = False   # recompute block activations in backward: less memory

    def __post_init__(self) -> None:
        check_types(self)
        if self.train_last_blocks is not None and self.train_last_blocks < 0:
            raise KForcingError("train_last_blocks must be >= 0")
        if isinstance(self.student, dict):
            self.student = from_dict(StudentConfig, self.student)
        if self.k < 1 or self.k > self.student.max_k:
            raise KForcingError(f"k={self.k} must be in [1, max_k={self.student.max_k}]")
        if self.target not in TARGETS:
            raise KForcingError(f"target must be one of {TARGETS}, got '{self.target}'")
        if not 0 < self.tau_min <= self.tau_max < math.inf:
            raise KForcingError(f"need 0 < tau_min <= tau_max, both finite; got tau_min "
                                f"{self.tau_min}, tau_max {self.tau_max}")
        for name in ("lr", "noise_lr", "time_budget_min"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise KForcingError(f"{name} must be a finite number > 0, got {value}")
        for name in ("eval_every_min", "grad_clip", "weight_decay", "warmup_steps"):
            if not 0 <= getattr(self, name) < math.inf:
                raise KForcingError(f"{name} must be a finite number >= 0, got "
                                    f"{getattr(self, name)}")
        for name in ("max_steps", "batch_size", "ckpt_every", "eval_contexts", "data_free_tokens"):
            if getattr(self, name) < 1:
                raise KForcingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise KForcingError(f"block_size must be >= 2, got {self.block_size}")
        if self.tau_start is not None and not 0 < self.tau_start <= self.tau_max:
            raise KForcingError("need 0 < tau_start <= tau_max")
        if self.pos_weights is not None and len(self.pos_weights) != self.k:
            raise KForcingError(f"pos_weights needs {self.k} entries, got {len(self.pos_weights)}")
        if self.windows < 1 or self.windows > self.block_size:
            raise KForcingError("windows must be in [1, block_size]")


def stage_student_config(init: str | None, flags: dict[str, Any]) -> StudentConfig:
    """The student config of a stage from the flags the user gave: with --init, the init
    student's layout, head, CDF order and noise encoder are inherited (a flag that contradicts
    one of them is refused, naming both values); without, the defaults."""
    if init is None:
        return from_dict(StudentConfig, flags)
    prev = student_info(init).config
    _check_inherited(prev, {k: v for k, v in flags.items() if k in INHERITED}, init)
    return from_dict(StudentConfig, {**asdict(prev), **flags})


def _check_inherited(prev: StudentConfig, wanted: dict[str, Any], init: str) -> None:
    clash = [f"{k} {v!r} here, {getattr(prev, k)!r} in {init}" for k, v in wanted.items()
             if k in INHERITED and v != getattr(prev, k)]
    if clash:
        raise KForcingError(f"a stage must keep the previous stage's layout and head (and CDF "
                            f"order, noise encoder): {'; '.join(clash)}; drop the flag to "
                            "inherit it")


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A DistillConfig dict with its paths made absolute, for the resume check."""
    paths = {k: str(Path(cfg[k]).resolve()) for k in ("teacher", "data", "init") if cfg.get(k)}
    return {**cfg, **paths}


def freeze_backbone(student: PushForward, last_blocks: int) -> None:
    """Train only the last `last_blocks` blocks (+ final norm) of the student's backbone; the
    noise encoder always trains. Gradients still flow back through the frozen blocks to the noise
    encoder (noise tokens enter at the bottom), so this saves weight-gradient work and optimizer
    memory, not the backward pass itself."""
    bb = student.backbone
    bb.requires_grad_(False)
    for layer in bb.layers[max(0, len(bb.layers) - last_blocks):] if last_blocks else []:
        layer.requires_grad_(True)
    if last_blocks:
        bb.norm.requires_grad_(True)


# -- the stage ---------------------------------------------------------------------------------

class Distiller:
    def __init__(self, cfg: DistillConfig, *, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out_dir)
        self.ctx, self.device = distributed.setup(cfg.device)
        if self.ctx.world > 1:
            distributed.shard(range(cfg.batch_size))      # the global batch splits evenly
        self.run = RunDir(self.out, main=self.ctx.main)
        # pre-flight: everything knowable before the first step is checked here
        if not cfg.data and not cfg.data_free:
            raise KForcingError("no --data given: prepare a corpus with the teacher's tokenizer "
                                "or pass --data-free to distill on the teacher's own samples")
        if cfg.data:
            check_corpus(Path(cfg.data), cfg.block_size)
        self.teacher_dir = resolve_model_dir(cfg.teacher)
        self.teacher = load_model(self.teacher_dir, device=self.device).requires_grad_(False)
        context = self.teacher.config.max_seq_len
        if cfg.block_size + cfg.k > context:
            raise KForcingError(f"block_size {cfg.block_size} + k {cfg.k} exceeds the teacher's "
                                f"context {context}: use --block-size {context - cfg.k} or less")
        torch.manual_seed(cfg.seed)
        if cfg.init:
            self.prev = load_student(cfg.init, device=self.device).requires_grad_(False)
            _check_inherited(self.prev.config, {k: getattr(cfg.student, k) for k in INHERITED},
                             cfg.init)
            # the new stage starts from a trainable copy of the frozen previous stage
            # (sharing, not copying, the frozen teacher a teacher-preserving student holds)
            t = self.prev.teacher
            self.student = copy.deepcopy(self.prev, {id(t): t} if t is not None else None)
            self.student.backbone.requires_grad_(True)
            self.student.noise.requires_grad_(True)
            self.student.config = cfg.student
            self.student.noise.cfg = cfg.student
        else:
            self.prev = None
            self.student = PushForward(self.teacher, cfg.student).to(self.device)
            if self._exact_k1() and cfg.k == 2 and cfg.target == "self-forcing":
                # teacher-preserving + inverse-cdf at k=1 *is* the teacher's sampler: the
                # untrained student is an exact stage-1 model
                self.prev = PushForward(self.teacher, cfg.student).to(self.device).eval()
        if self.prev is None and cfg.k > 1 and cfg.target == "self-forcing":
            raise KForcingError(f"self-forcing stage k={cfg.k} needs --init (the stage-"
                                f"{cfg.k // 2} student)")
        if cfg.init and cfg.target == "self-forcing" and 2 * self._prev_k() != cfg.k:
            raise KForcingError(f"self-forcing doubles k: init was trained at k="
                                f"{self._prev_k()}, this stage has k={cfg.k}")
        if cfg.train_last_blocks is not None:
            freeze_backbone(self.student, cfg.train_last_blocks)
        self.student.backbone.grad_checkpoint = cfg.grad_checkpoint
        self.student.train()
        noise_params = list(self.student.noise.parameters())
        backbone = [p for p in self.student.backbone.parameters() if p.requires_grad]
        self.ddp = distributed.wrap(distributed.Method(self.student, "staircase_forward"),
                                    self.device)
        self.opt = torch.optim.AdamW(
            [{"params": backbone, "lr": cfg.lr}, {"params": noise_params, "lr": cfg.noise_lr}],
            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        for writer in (True, False):    # rank 0 makes the data-free cache, the others read it
            if self.ctx.main == writer:
                data = Path(cfg.data) if cfg.data else self._teacher_samples()
            distributed.barrier()
        train_tokens, val_tokens = check_corpus(data, cfg.block_size)
        vocab = self.teacher.config.vocab_size
        if (train_tokens.vocab_size or 0) > vocab:
            raise KForcingError(f"{data} was tokenized with a vocabulary of "
                                f"{train_tokens.vocab_size}, more than the teacher's {vocab}: "
                                "prepare it with the teacher's tokenizer (--tokenizer)")
        if (self.teacher_dir / TOKENIZER_FILE).is_file():   # copied into every checkpoint
            load_tokenizer(self.teacher_dir / TOKENIZER_FILE)
        self.loader = BlockLoader(train_tokens, block_size=cfg.block_size,
                                  batch_size=cfg.batch_size, seed=cfg.seed,
                                  shard=distributed.shard if self.ctx.world > 1 else None)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.val = self._validation_set(val_tokens)
        # on a CPU the budget and the logged minutes are this process's CPU time (as in the
        # feedback trainer), so runs sharing a core still compare at equal CPU-minutes
        on_cpu = torch.device(self.device).type == "cpu"
        self.clock = time.process_time if on_cpu else time.perf_counter    # (seconds)
        self.step, self.elapsed = 0, 0.0
        self.last_eval = -math.inf     # training minutes at the last validation
        self.metrics = self.run.metrics
        self.run.start(resume)      # the last check: nothing is written before it
        distributed.barrier()
        if resume:
            self._resume()

    def _teacher_samples(self) -> Path:
        """Data-free mode: a corpus of the teacher's own samples, cached next to the run."""
        return teacher_corpus(self.teacher, self.teacher_dir, self.out.parent / "teacher-samples",
                              n_tokens=self.cfg.data_free_tokens, seq_len=2 * self.cfg.block_size,
                              seed=self.cfg.seed, progress=self.progress)

    def _exact_k1(self) -> bool:
        s = self.cfg.student
        return s.layout == "teacher-preserving" and s.head == "inverse-cdf"

    def _prev_k(self) -> int:
        return 0 if self.cfg.init is None else student_info(self.cfg.init).k or 0

    # targets for one batch (this rank's shard x of it)
    def _batch(self, x: torch.Tensor, gen: torch.Generator, M: int):
        cfg = self.cfg
        B, N = x.shape
        k, order = cfg.k, cfg.student.cdf_order
        # every rank draws the global batch's randomness and keeps its own rows, so gen stays in
        # step across ranks and N ranks see what one process would
        rows = distributed.shard(range(B * self.ctx.world), self.ctx)
        anchors = torch.randperm(N - (k if cfg.target == "noise-inversion" else 0),
                                 generator=gen)[:M].sort().values.to(x.device)
        lo, hi = self.tau_range()
        tau = (lo + (hi - lo) * torch.rand(B * self.ctx.world, generator=gen,
                                           dtype=torch.float64))[rows].to(x.device)
        if cfg.target == "noise-inversion":
            if self.ctx.world > 1:   # drawn inside invert_noise: a per-step, per-rank stream
                seed = int(torch.randint(2**62, (1,), generator=gen)) + self.ctx.rank
                gen = torch.Generator().manual_seed(seed)
            u, y = invert_noise(self.teacher, x, tau, anchors, k, order, gen)
            return anchors, u, tau, y
        u = torch.rand(B * self.ctx.world, M, k, generator=gen,
                       dtype=torch.float64)[rows].to(x.device)
        if cfg.target == "ar-rollout" or self.prev is None:
            y = ar_rollout(self.teacher, x, u, tau, anchors, order)
        else:
            with torch.no_grad():
                h = k // 2
                y1 = self.prev.staircase_forward(x, u[..., :h], tau, anchors).tokens
                y2 = self.prev.staircase_forward(x, u[..., h:], tau, anchors, known=y1).tokens
            y = torch.cat([y1, y2], dim=2)
        return anchors, u, tau, y

    def tau_range(self) -> tuple[float, float]:
        cfg = self.cfg
        if cfg.tau_start is None:
            return cfg.tau_min, cfg.tau_max
        if cfg.time_budget_min:
            progress = self.elapsed / (60 * cfg.time_budget_min)
        else:
            progress = self.step / cfg.max_steps
        frac = min(1.0, progress / max(cfg.tau_ramp, 1e-9))
        hi = cfg.tau_start + (cfg.tau_max - cfg.tau_start) * frac
        return min(cfg.tau_min, hi), hi

    def loss(self, x, anchors, u, tau, y) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.ddp(x, u, tau, anchors)     # student.staircase_forward, under DDP
        k = self.cfg.k
        w = torch.tensor(self.cfg.pos_weights or [1.0] * k, device=x.device)
        if self.cfg.student.head == "inverse-cdf":
            # soft targets: the teacher's own conditionals along the target tokens, at tau
            t = tau.view(-1, 1, 1, 1).float()
            p = tempered_probs(teacher_conditionals(self.teacher, x, y[..., :-1], anchors), tau)
            ce = -(p * (out.logits.float() / t).log_softmax(-1)).sum(-1)    # (B, M, k)
        else:
            ce = F.cross_entropy(out.logits.flatten(0, 2).float(), y.flatten(),
                                 reduction="none").view(*y.shape)           # (B, M, k)
        if self.cfg.student.head == "inverse-cdf" and self.student.teacher is not None:
            ce[..., 0] = 0.0          # q_1 is the frozen teacher's own distribution
        loss = (ce.mean((0, 1)) * w).sum() / w.sum()
        match = (out.tokens == y).float().mean((0, 1))                      # (k,)
        return loss, match

    def _validation_set(self, tokens: TokenFile) -> MatchSet:
        """Fixed held-out contexts, anchors, uniforms and exact AR targets at tau 1 and 0.7."""
        cfg = self.cfg
        return build_match_set(self.teacher, tokens, k=cfg.k, block_size=cfg.block_size,
                               n_windows=cfg.eval_contexts, taus=[1.0, 0.7, cfg.tau_min],
                               order=cfg.student.cdf_order, seed=cfg.seed, device=self.device)

    def validate(self) -> dict:
        return match_rates(self.student, self.val)

    # checkpoints
    def _write(self, d: Path) -> None:
        save_student(self.student, d, self.teacher_dir,
                     extra={"k": self.cfg.k, "distill": asdict(self.cfg), "step": self.step})
        tensors, meta = optimizer_tensors(self.opt)
        tensors.update({distributed.rng_key(r): s for r, s in enumerate(self._rng)})
        tensors["rng.batch"] = self.gen.get_state()
        atomic_save_tensors(d / TRAINER_TENSORS, tensors)
        atomic_write_json(d / TRAINER_JSON, {"step": self.step, "elapsed": self.elapsed,
                                             "last_eval": self.last_eval
                                             if math.isfinite(self.last_eval) else None,
                                             "loader": self.loader.state_dict(),
                                             "optimizer": meta})

    def save(self) -> Path:
        """Every rank calls it (for its RNG state); rank 0 writes, the others wait for it."""
        self._rng = distributed.gather_rng()
        path = self.run.publish(self.step, self._write)
        distributed.barrier()
        return path

    @staticmethod
    def _read(d: Path) -> dict[str, Any]:
        """Every file of a checkpoint, read (and so checked) before any of it is applied."""
        ckpt = {"meta": load_json(d / STUDENT_JSON), "weights": load_tensors(d / STUDENT_FILE),
                "tensors": load_tensors(d / TRAINER_TENSORS), "state": load_json(d / TRAINER_JSON)}
        missing = [k for k in ("distill",) if k not in ckpt["meta"]] + \
            [k for k in ("step", "elapsed", "loader", "optimizer") if k not in ckpt["state"]] + \
            [k for k in ("rng.torch", "rng.batch") if k not in ckpt["tensors"]]
        if missing:
            raise KForcingError(f"incomplete checkpoint {d}: no {', '.join(missing)}")
        return ckpt

    def _resume(self) -> None:
        found = self.run.resume(self._read)
        if found is None:
            return
        d, ckpt = found
        check_same_config(_comparable(ckpt["meta"]["distill"]), _comparable(asdict(self.cfg)),
                          RESUMABLE)
        load_state(self.student, ckpt["weights"], d / STUDENT_FILE)
        load_optimizer_tensors(self.opt, ckpt["tensors"], ckpt["state"]["optimizer"])
        rng = distributed.rng_key(self.ctx.rank)
        if rng not in ckpt["tensors"]:
            raise KForcingError(f"cannot resume: checkpoint {d} was written by fewer than "
                                f"{self.ctx.world} processes (no {rng}); resume with as many")
        torch.set_rng_state(ckpt["tensors"][rng])
        self.gen.set_state(ckpt["tensors"]["rng.batch"])
        self.loader.load_state_dict(ckpt["state"]["loader"])
        self.step, self.elapsed = ckpt["state"]["step"], ckpt["state"]["elapsed"]
        last_eval = ckpt["state"].get("last_eval")     # (absent in older checkpoints)
        self.last_eval = -math.inf if last_eval is None else last_eval
        self.metrics.rewind(self.step)

    def log(self, rec: dict) -> None:
        self.metrics.append(rec)

    def train_step(self) -> dict:
        cfg = self.cfg
        x, _ = self.loader.next_batch()
        x = x.to(self.device)                       # this rank's shard: (B / world, N)
        anchors, u, tau, y = self._batch(x, self.gen, cfg.windows)
        scale = min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        for g, base in zip(self.opt.param_groups, (cfg.lr, cfg.noise_lr), strict=True):
            g["lr"] = base * scale
        loss, match = self.loss(x, anchors, u, tau, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        match = distributed.mean_tensor(match)
        return {"loss": distributed.mean(loss.item()),
                "match": [round(float(m), 4) for m in match]}

    def fit(self, stop_after: int | None = None) -> dict:
        cfg = self.cfg
        budget = cfg.time_budget_min * 60 if cfg.time_budget_min else None
        target = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        bar = Progress(f"distill k={cfg.k}", max_steps=target, budget_min=cfg.time_budget_min,
                       step=self.step, minutes=self.elapsed / 60,
                       enabled=self.progress and self.ctx.main)
        with stop_signals() as stop:
            if self.step == 0:
                self.log({"step": 0, "minutes": 0.0, "val": self.validate()})
                self.last_eval = 0.0
            t_last = self.clock()
            while self.step < target and (budget is None or self.elapsed < budget):
                rec = self.train_step()
                now = self.clock()
                # the slowest rank's clock, so every rank validates and stops at the same step
                self.elapsed = distributed.maximum(self.elapsed + now - t_last)
                t_last = now
                rec = {"step": self.step, "minutes": round(self.elapsed / 60, 3), **rec}
                if self.elapsed / 60 - self.last_eval >= cfg.eval_every_min:
                    rec["val"] = self.validate()
                    self.last_eval = self.elapsed / 60
                    t_last = self.clock()
                self.log(rec)
                bar.update(self.step, self.elapsed / 60, loss=f"{rec['loss']:.3f}",
                           m1=f"{rec['match'][0]:.2f}")
                stopping = distributed.maximum(float(bool(stop))) > 0   # one rank's signal
                if self.step % cfg.ckpt_every == 0 or stopping:
                    self.save()
                    t_last = self.clock()
                if stopping:
                    bar.close()
                    raise interrupted(stop, self.step, self.out)
            bar.close()
            rec = {"step": self.step, "minutes": round(self.elapsed / 60, 3),
                   "val": self.validate(), "final": True}
            self.log(rec)
            self.save()
        return rec


def distill(cfg: DistillConfig, *, resume: bool = False, progress: bool = True) -> dict:
    return Distiller(cfg, resume=resume, progress=progress).fit()
