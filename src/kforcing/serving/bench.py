"""`kforcing bench-serve`: load-test a running server over loopback with the official `openai`
client, per mode and concurrency, and write one JSON row per cell.

Each cell sends `requests` streamed completions, at most `concurrency` at a time, every one
with `kforcing.ignore_eos` so that it must return exactly `max_tokens` tokens. Per cell:
throughput (completion tokens / wall seconds), latency percentiles, time to first token,
errors (non-2xx or a broken connection), lost (a stream that ended without its final chunk)
and truncated (fewer tokens than asked) responses. A few warm-up requests per mode come first
and are not counted. With `rounds` > 1 each concurrency's cells are split into that many rounds
in which the modes take turns (the order rotating), so that a machine whose speed drifts during
the run slows every mode alike; a row sums its rounds. The server is started by
`run_with_server` (a `kforcing serve` subprocess) or already running (`--url`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openai import AsyncOpenAI

from kforcing.decoding.autok import machine_info
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import atomic_write_json
from kforcing.serving.config import BenchServeConfig


@dataclass
class _Result:
    ok: bool = False
    lost: bool = False
    tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    stats: dict = field(default_factory=dict)
    error: str | None = None


async def _one(client, model: str, cfg: BenchServeConfig, mode: str, i: int) -> _Result:
    """Request i: prompt i (cycling through cfg.prompts) with seed i."""
    kf = {"mode": mode, "ignore_eos": True}
    if cfg.k is not None and mode != "ar":
        kf["k"] = cfg.k
    res, t0 = _Result(), time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=cfg.prompts[i % len(cfg.prompts)], max_tokens=cfg.max_tokens,
            temperature=cfg.temperature, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"kforcing": kf})
        finished = False
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].text and res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - t0
                finished = finished or chunk.choices[0].finish_reason is not None
            if chunk.usage is not None:
                res.tokens = chunk.usage.completion_tokens
                res.stats = (chunk.model_extra or {}).get("kforcing") or {}
        res.latency_s = time.perf_counter() - t0
        res.lost = not finished or not res.stats
        res.ok = True
    except Exception as e:      # every failure is counted, none stops the benchmark
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_cell(url: str, model: str, cfg: BenchServeConfig, mode: str, concurrency: int,
                   n: int, api_key: str | None = None, start: int = 0
                   ) -> tuple[list[_Result], float]:
    """Requests start .. start + n - 1, at most `concurrency` in flight: (results, wall
    seconds)."""
    sem = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none",
                           timeout=cfg.timeout_s, max_retries=0) as client:
        async def bounded(i: int) -> _Result:
            async with sem:
                return await _one(client, model, cfg, mode, i)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(start + i) for i in range(n)))
        return list(results), time.perf_counter() - t0


def summarize(mode: str, concurrency: int, cfg: BenchServeConfig, results: list[_Result],
              seconds: float) -> dict:
    ok = [r for r in results if r.ok and not r.lost]
    lat = sorted(r.latency_s for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    # time in the server's queue before a wave took the request: the cost of waves
    queue = sorted(r.stats["queue_ms"] / 1000 for r in ok if "queue_ms" in r.stats)
    ks = sorted({r.stats.get("k") for r in ok if r.stats.get("k") is not None})
    used = sorted({r.stats.get("mode") for r in ok if r.stats.get("mode")})
    errors = [r.error for r in results if r.error]

    def pct(xs: list[float], q: float) -> float | None:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None

    row = {"mode": mode, "concurrency": concurrency, "requests": len(results),
           "errors": len(errors), "lost": sum(r.lost for r in results if r.ok),
           "truncated": sum(r.tokens < cfg.max_tokens for r in ok),
           "tokens_per_s": round(sum(r.tokens for r in ok) / seconds, 1) if seconds else 0.0,
           "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95),
           "ttft_p50_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
           "queue_p50_ms": pct(queue, 0.5), "queue_p95_ms": pct(queue, 0.95),
           "seconds": round(seconds, 2), "max_tokens": cfg.max_tokens, "k": ks,
           "decoded_as": used,
           "tokens_per_pass": round(statistics.mean(r.stats.get("tokens_per_pass", 0)
                                                    for r in ok), 3) if ok else None,
           "mean_batch": round(statistics.mean(r.stats.get("batch_size", 0) for r in ok), 1)
           if ok else None}
    if errors:
        row["first_error"] = errors[0][:300]
    return row


def bench_serve(url: str, model: str, cfg: BenchServeConfig, *, api_key: str | None = None,
                log=None) -> list[dict]:
    """Every (mode, concurrency) cell against the server at url; one row each, modes first."""
    for mode in cfg.modes:
        if cfg.warmup:
            asyncio.run(run_cell(url, model, cfg, mode, min(cfg.warmup, max(cfg.concurrency)),
                                 cfg.warmup, api_key))
    cells: dict[tuple[str, int], dict] = {}
    for c in cfg.concurrency:
        got: dict[str, tuple[list[_Result], float]] = {m: ([], 0.0) for m in cfg.modes}
        for r in range(cfg.rounds):
            n = cfg.requests // cfg.rounds + (r < cfg.requests % cfg.rounds)
            turn = r % len(cfg.modes)
            for mode in cfg.modes[turn:] + cfg.modes[:turn]:
                results, secs = asyncio.run(run_cell(url, model, cfg, mode, c, n, api_key,
                                                     start=len(got[mode][0])))
                got[mode] = (got[mode][0] + results, got[mode][1] + secs)
        learned = _health(url).get("k_auto", {})   # what --k auto had learned by now
        for mode in cfg.modes:
            row = summarize(mode, c, cfg, *got[mode])
            row["rounds"] = cfg.rounds
            if auto := learned.get(mode):
                row["k_auto"] = auto
            cells[mode, c] = row
            if log:
                log(json.dumps(row))
    return [cells[m, c] for m in cfg.modes for c in cfg.concurrency]


def _health(url: str, timeout_s: float = 10.0) -> dict:
    """GET /health; an empty dict unless the server answers 200 (not up, or draining)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as r:
            return json.load(r)
    except (OSError, ValueError):
        return {}


def write_rows(path: str | Path, rows: list[dict], meta: dict) -> None:
    """docs/results/serve.json: the list of rows; the command and machine in serve.meta.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rows)
    atomic_write_json(path.with_suffix(".meta.json"), {**meta, "machine": machine_info()})


# -- a server subprocess ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Poll GET /health until 200; fail early when the server process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise KForcingError(f"the server exited with code {proc.returncode} before it "
                                "was ready (see its messages above)")
        if _health(url, timeout_s=2):
            return
        time.sleep(0.2)
    raise KForcingError(f"the server at {url} was not ready after {timeout_s:.0f} s")


def served_model_id(url: str, api_key: str | None = None) -> str:
    req = urllib.request.Request(url.rstrip("/") + "/v1/models", headers=(
        {"Authorization": f"Bearer {api_key}"} if api_key else {}))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["data"][0]["id"]
    except OSError as e:
        raise KForcingError(f"no kforcing server answers at {url}: {e}") from None


def start_server(model_dir: str, args: list[str], port: int) -> subprocess.Popen:
    """`kforcing serve` in a subprocess on 127.0.0.1:port."""
    cmd = [sys.executable, "-m", "kforcing.cli.serve", "serve", "--model", model_dir,
           "--port", str(port), "--log-level", "warning", *args]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM, then wait (the server drains); SIGKILL only if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_with_server(model_dir: str, server_args: list[str], cfg: BenchServeConfig, *,
                    ready_timeout_s: float = 1800.0, log=None) -> tuple[list[dict], str]:
    """Start a server, benchmark it, stop it: (rows, the served model id)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model_dir, server_args, port)
    try:
        wait_healthy(url, proc, ready_timeout_s)
        model = served_model_id(url)
        return bench_serve(url, model, cfg, log=log), model
    finally:
        stop_server(proc)


def config_dict(cfg: BenchServeConfig) -> dict:
    return asdict(cfg)
