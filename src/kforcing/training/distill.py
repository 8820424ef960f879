"""Progressive distillation of an AR teacher into a K-Forcing student (METHOD.md section 4).

One call = one stage: a student with window k learns, from targets made by `target`, to emit
in one pass the k tokens the reference map produces from the same uniforms:
- `self-forcing` (the paper): stage 1 uses the AR teacher's InvCDF tokens; stage 2k' runs the
  frozen stage-k' student twice (two-level staircase);
- `ar-rollout`: exact k-step AR rollouts of the teacher, k teacher passes per batch;
- `noise-inversion`: real data tokens, with u drawn inside each data token's CDF interval under
  the teacher (one teacher pass gives targets for any k).
Each stage logs JSONL metrics and a validation learning curve (match rates vs wall-clock minutes)
and writes atomic, resumable checkpoints.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kforcing.io.checkpoint import (
    MetricsLog,
    atomic_save_tensors,
    atomic_write_json,
    load_model,
    load_tensors,
    publish_checkpoint,
    resolve_model_dir,
)
from kforcing.core.config import from_dict, load_json
from kforcing.io.data import BlockLoader, TokenFile
from kforcing.errors import KForcingError
from kforcing.evaluation.evaluate import MatchSet, build_match_set, match_rates
from kforcing.core.masks import staircase
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.core.sampling import inverse_cdf
from kforcing.training.teacher import load_optimizer_tensors, optimizer_tensors

TARGETS = ("self-forcing", "ar-rollout", "noise-inversion")
STUDENT_FILE, STUDENT_JSON = "student.safetensors", "student.json"


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
    time_budget_min: float | None = 10.0
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
        if self.train_last_blocks is not None and self.train_last_blocks < 0:
            raise KForcingError("train_last_blocks must be >= 0")
        if isinstance(self.student, dict):
            self.student = from_dict(StudentConfig, self.student)
        if self.k < 1 or self.k > self.student.max_k:
            raise KForcingError(f"k={self.k} must be in [1, max_k={self.student.max_k}]")
        if self.target not in TARGETS:
            raise KForcingError(f"target must be one of {TARGETS}, got '{self.target}'")
        if not 0 < self.tau_min <= self.tau_max:
            raise KForcingError("need 0 < tau_min <= tau_max")
        if self.tau_start is not None and not 0 < self.tau_start <= self.tau_max:
            raise KForcingError("need 0 < tau_start <= tau_max")
        if self.pos_weights is not None and len(self.pos_weights) != self.k:
            raise KForcingError(f"pos_weights needs {self.k} entries, got {len(self.pos_weights)}")
        if self.windows < 1 or self.windows > self.block_size:
            raise KForcingError("windows must be in [1, block_size]")


# -- students on disk --------------------------------------------------------------------------

def save_student(student: PushForward, out: Path, teacher_dir: Path, extra: dict | None = None
                 ) -> None:
    """Weights + config; a teacher-preserving student stores no teacher weights, only a path."""
    atomic_save_tensors(out / STUDENT_FILE, _student_state(student), metadata={"format": "pt"})
    atomic_write_json(out / STUDENT_JSON, {"student": asdict(student.config),
                                           "teacher": str(Path(teacher_dir).resolve()),
                                           **(extra or {})})
    tok = Path(teacher_dir) / "tokenizer.json"
    if tok.is_file():
        (out / "tokenizer.json").write_bytes(tok.read_bytes())


def _student_state(student: PushForward) -> dict[str, torch.Tensor]:
    state = student.state_dict()
    if student.model_config.tie_embeddings:
        state.pop("backbone.output.weight", None)
    return state


def resolve_student_dir(path: str | Path) -> Path:
    d = Path(path)
    if not d.exists():
        raise KForcingError(f"checkpoint not found: {path}")
    if (d / STUDENT_JSON).is_file() or _shared_kind(d) == "student":
        return d
    latest = d / "checkpoints" / "latest.json"
    if latest.is_file():
        d = resolve_model_dir(d) if not (d / STUDENT_JSON).is_file() else d
        if (d / STUDENT_JSON).is_file():
            return d
    raise KForcingError(f"no K-Forcing student in {path}: expected {STUDENT_JSON}")


def _shared_kind(d: Path) -> str | None:
    from kforcing.students.share import shared_kind
    return shared_kind(d)


def is_student_dir(path: str | Path) -> bool:
    try:
        resolve_student_dir(path)
        return True
    except KForcingError:
        return False


def load_student(path: str | Path, device: str = "cpu") -> PushForward:
    """Rebuild a student from its directory (and its teacher, found through the saved path)."""
    d = resolve_student_dir(path)
    if not (d / STUDENT_JSON).is_file():          # a self-contained kforcing.save directory
        from kforcing.students.share import load
        return load(d, device=device)
    meta = load_json(d / STUDENT_JSON)
    teacher = load_model(meta["teacher"], device=device)
    student = PushForward(teacher, from_dict(StudentConfig, meta["student"]))
    state = load_tensors(d / STUDENT_FILE)
    if teacher.config.tie_embeddings and "backbone.tok_embeddings.weight" in state:
        state["backbone.output.weight"] = state["backbone.tok_embeddings.weight"]
    try:
        student.load_state_dict(state)
    except RuntimeError as e:
        raise KForcingError(f"{d / STUDENT_FILE} does not match its config: "
                            f"{str(e).splitlines()[0]}") from None
    return student.to(device).eval()


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


def teacher_of(student: PushForward, student_dir: str | Path | None = None):
    """The AR teacher behind a student: the frozen one it holds (teacher-preserving layout),
    else the teacher checkpoint named in its student.json (a shared-layout student's backbone
    is fine-tuned, so it is not the teacher)."""
    if student.teacher is not None:
        return student.teacher
    if student_dir is None:
        raise KForcingError("this shared-layout student holds no teacher: give its directory")
    d = resolve_student_dir(student_dir)
    if not (d / STUDENT_JSON).is_file():   # a self-contained shareable directory
        raise KForcingError(f"{student_dir} is a shared-layout student saved without its "
                            "teacher: load the teacher separately (e.g. kforcing import)")
    meta = load_json(d / STUDENT_JSON)
    return load_model(meta["teacher"], device=next(student.parameters()).device)


# -- targets -----------------------------------------------------------------------------------

@torch.no_grad()
def teacher_conditionals(teacher, x: torch.Tensor, known: torch.Tensor, anchors: torch.Tensor
                         ) -> torch.Tensor:
    """Teacher logits p(. | x<=t, y_<i) for i = 1..j+1 along known tokens y (B, M, j), for
    each anchor t, in one staircase pass: (B, M, j+1, V)."""
    B, N = x.shape
    M, j = anchors.numel(), known.shape[-1]
    st = staircase(N, j, anchors, device=x.device)
    logits = teacher(torch.cat([x, known.flatten(1, 2)], 1), input_pos=st.positions,
                     mask=st.mask[None, None])
    first = logits[:, anchors].unsqueeze(2)                                  # (B, M, 1, V)
    return torch.cat([first, logits[:, N:].view(B, M, j, logits.shape[-1])], dim=2)


@torch.no_grad()
def ar_rollout(teacher, x: torch.Tensor, u: torch.Tensor, tau: torch.Tensor, anchors: torch.Tensor,
               order: str) -> torch.Tensor:
    """Exact k-step AR samples G(x<=t, u_1..u_k) for each anchor: (B, M, k) tokens.

    Step j runs the teacher once over [context | windows of the j-1 tokens drawn so far]."""
    B = x.shape[0]
    ys = torch.empty(B, anchors.numel(), 0, dtype=torch.long, device=x.device)
    for j in range(u.shape[-1]):
        logits = teacher_conditionals(teacher, x, ys, anchors)[:, :, -1]     # (B, M, V)
        probs = (logits.float() / tau.view(B, 1, 1).float()).softmax(-1)
        ys = torch.cat([ys, inverse_cdf(probs, u[..., j], order)[..., None]], dim=2)
    return ys


@torch.no_grad()
def invert_noise(teacher, x: torch.Tensor, tau: torch.Tensor, anchors: torch.Tensor, k: int,
                 order: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Data tokens x[t+1..t+k] as targets and uniforms inside their CDF intervals: (u, y)."""
    B, N = x.shape
    probs = (teacher(x).float() / tau.view(B, 1, 1).float()).softmax(-1)     # (B, N, V)
    if order == "sorted":
        probs, perm = torch.sort(probs, dim=-1, descending=True, stable=True)
        rank = torch.argsort(perm, -1)
    idx = anchors[:, None] + torch.arange(k, device=x.device)               # (M, k)
    y = x[:, (idx + 1).clamp(max=N - 1)]                                     # (B, M, k)
    p = probs[:, idx]                                                       # (B, M, k, V)
    col = y if order == "vocab" else rank[:, idx].gather(-1, y[..., None]).squeeze(-1)
    cdf = p.double().cumsum(-1)
    total = cdf[..., -1]
    hi = cdf.gather(-1, col[..., None]).squeeze(-1)
    lo = hi - p.double().gather(-1, col[..., None]).squeeze(-1)
    r = torch.rand(y.shape, generator=generator, dtype=torch.float64).to(x.device)
    u = ((lo + r * (hi - lo)) / total).clamp(0.0, 1.0 - 1e-12)
    return u, y


# -- the stage ---------------------------------------------------------------------------------

class Distiller:
    def __init__(self, cfg: DistillConfig, *, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out_dir)
        self.teacher_dir = resolve_model_dir(cfg.teacher)
        self.teacher = load_model(self.teacher_dir, device=cfg.device).requires_grad_(False)
        torch.manual_seed(cfg.seed)
        if cfg.init:
            self.prev = load_student(cfg.init, device=cfg.device).requires_grad_(False)
            if self.prev.config.layout != cfg.student.layout or \
                    self.prev.config.head != cfg.student.head:
                raise KForcingError("a stage must keep the previous stage's layout and head")
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
            self.student = PushForward(self.teacher, cfg.student).to(cfg.device)
            if self._exact_k1() and cfg.k == 2 and cfg.target == "self-forcing":
                # teacher-preserving + inverse-cdf at k=1 *is* the teacher's sampler: the
                # untrained student is an exact stage-1 model
                self.prev = PushForward(self.teacher, cfg.student).to(cfg.device).eval()
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
        self.opt = torch.optim.AdamW(
            [{"params": backbone, "lr": cfg.lr}, {"params": noise_params, "lr": cfg.noise_lr}],
            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        if not cfg.data and not cfg.data_free:
            raise KForcingError("no --data given: prepare a corpus with the teacher's tokenizer "
                                "or pass --data-free to distill on the teacher's own samples")
        data = Path(cfg.data) if cfg.data else self._teacher_samples()
        self.loader = BlockLoader(TokenFile(data / "train.bin"), block_size=cfg.block_size,
                                  batch_size=cfg.batch_size, seed=cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.val = self._validation_set(TokenFile(data / "validation.bin"))
        self.step, self.elapsed = 0, 0.0
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        if resume:
            self._resume()
        elif (self.out / "checkpoints" / "latest.json").exists():
            raise KForcingError(f"{self.out} already holds a run: pass --resume or another --out")

    def _teacher_samples(self) -> Path:
        """Data-free mode: a corpus of the teacher's own samples, cached next to the run."""
        from kforcing.training.selfdata import teacher_corpus
        return teacher_corpus(self.teacher, self.teacher_dir, self.out.parent / "teacher-samples",
                              n_tokens=self.cfg.data_free_tokens, seq_len=2 * self.cfg.block_size,
                              seed=self.cfg.seed, progress=self.progress)

    def _exact_k1(self) -> bool:
        s = self.cfg.student
        return s.layout == "teacher-preserving" and s.head == "inverse-cdf"

    def _prev_k(self) -> int:
        if self.cfg.init is None:
            return 0
        return load_json(resolve_student_dir(self.cfg.init) / STUDENT_JSON).get("k", 0)

    # targets for one batch
    def _batch(self, x: torch.Tensor, gen: torch.Generator, M: int):
        cfg = self.cfg
        B, N = x.shape
        k, order = cfg.k, cfg.student.cdf_order
        anchors = torch.randperm(N - (k if cfg.target == "noise-inversion" else 0),
                                 generator=gen)[:M].sort().values.to(x.device)
        lo, hi = self.tau_range()
        tau = (lo + (hi - lo) * torch.rand(B, generator=gen, dtype=torch.float64)).to(x.device)
        if cfg.target == "noise-inversion":
            u, y = invert_noise(self.teacher, x, tau, anchors, k, order, gen)
            return anchors, u, tau, y
        u = torch.rand(B, M, k, generator=gen, dtype=torch.float64).to(x.device)
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
        out = self.student.staircase_forward(x, u, tau, anchors)
        k = self.cfg.k
        w = torch.tensor(self.cfg.pos_weights or [1.0] * k, device=x.device)
        if self.cfg.student.head == "inverse-cdf":
            # soft targets: the teacher's own conditionals along the target tokens, at tau
            t = tau.view(-1, 1, 1, 1).float()
            p = (teacher_conditionals(self.teacher, x, y[..., :-1], anchors).float() / t
                 ).softmax(-1)
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
                               order=cfg.student.cdf_order, seed=cfg.seed, device=cfg.device)

    def validate(self) -> dict:
        return match_rates(self.student, self.val)

    # checkpoints
    def _write(self, d: Path) -> None:
        save_student(self.student, d, self.teacher_dir,
                     extra={"k": self.cfg.k, "distill": asdict(self.cfg), "step": self.step})
        tensors, meta = optimizer_tensors(self.opt)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.batch"] = self.gen.get_state()
        atomic_save_tensors(d / "trainer.safetensors", tensors)
        atomic_write_json(d / "trainer.json", {"step": self.step, "elapsed": self.elapsed,
                                               "loader": self.loader.state_dict(),
                                               "optimizer": meta})

    def save(self) -> Path:
        return publish_checkpoint(self.out, self.step, self._write)

    def _resume(self) -> None:
        latest = self.out / "checkpoints" / "latest.json"
        if not latest.is_file():
            raise KForcingError(f"nothing to resume in {self.out}")
        d = self.out / "checkpoints" / load_json(latest)["name"]
        resumed = load_student(d, device=self.cfg.device)
        self.student.load_state_dict(resumed.state_dict())
        tensors = load_tensors(d / "trainer.safetensors")
        state = load_json(d / "trainer.json")
        load_optimizer_tensors(self.opt, tensors, state["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.batch"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.metrics.rewind(self.step)

    def log(self, rec: dict) -> None:
        self.metrics.append(rec)

    def fit(self, stop_after: int | None = None) -> dict:
        cfg = self.cfg
        budget = cfg.time_budget_min * 60 if cfg.time_budget_min else None
        target = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        bar = tqdm(total=target, initial=self.step, disable=not self.progress,
                   desc=f"distill k={cfg.k}", unit="step", dynamic_ncols=True)
        last_eval = -math.inf
        if self.step == 0:
            self.log({"step": 0, "minutes": 0.0, "val": self.validate()})
            last_eval = 0.0
        rec: dict = {}
        t_last = time.perf_counter()
        while self.step < target and (budget is None or self.elapsed < budget):
            x, _ = self.loader.next_batch()
            x = x.to(cfg.device)
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
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            rec = {"step": self.step, "minutes": round(self.elapsed / 60, 3),
                   "loss": loss.item(), "match": [round(float(m), 4) for m in match]}
            if self.elapsed / 60 - last_eval >= cfg.eval_every_min:
                rec["val"] = self.validate()
                last_eval = self.elapsed / 60
                t_last = time.perf_counter()
            self.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", m1=f"{float(match[0]):.2f}")
            if self.step % cfg.ckpt_every == 0:
                self.save()
                t_last = time.perf_counter()
        bar.close()
        rec = {"step": self.step, "minutes": round(self.elapsed / 60, 3), "val": self.validate(),
               "final": True}
        self.log(rec)
        self.save()
        return rec


def distill(cfg: DistillConfig, *, resume: bool = False, progress: bool = True) -> dict:
    return Distiller(cfg, resume=resume, progress=progress).fit()
