"""`kforcing serve` as a library call: load the model, calibrate `--k auto`, run uvicorn.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections; the scheduler takes no new requests
and lets the accepted ones finish for up to `grace_s` seconds, then ends the rows still running
(their responses end normally, finish_reason "length", with a note) and refuses the ones that
never started (503). uvicorn waits a few seconds more for those responses to be written.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn

from kforcing.decoding.ar import generate_ar
from kforcing.decoding.generate import compile_decoders, generate
from kforcing.serving.app import ServerSettings, create_app
from kforcing.serving.config import ServeConfig
from kforcing.serving.engine import Engine, ServedModel, load_served
from kforcing.serving.scheduler import Scheduler

log = logging.getLogger("kforcing.serve")

WRITE_S = 5.0           # after the grace: how long uvicorn waits for last chunks to be written


class _Server(uvicorn.Server):
    """uvicorn's server, telling the scheduler to drain on the first exit signal. A drained
    SIGTERM exits with status 0 (uvicorn would re-raise it); Ctrl-C still interrupts."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.drain(self.grace_s)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals.remove(sig)


def build(cfg: ServeConfig) -> tuple[_Server, Engine, Scheduler]:
    """The server, ready to run (model loaded, `--k auto` calibrated for every batch size)."""
    served = load_served(Path(cfg.model), device=cfg.device, name=cfg.name)
    if cfg.compile and served.ar_model is None:
        log.warning("--compile: no AR model is served (a shared-layout student without its "
                    "teacher), so nothing is compiled")
    elif cfg.compile:
        compile_warm(served, cfg.max_batch)
    engine = Engine(served, mode=cfg.mode, k=cfg.k, autok_cache=cfg.autok_cache)
    engine.warm_up(cfg.max_batch)
    scheduler = Scheduler(engine, cfg.max_batch, cfg.batch_wait_ms / 1000)
    app = create_app(engine, scheduler, ServerSettings(
        api_key=cfg.api_key, max_body=cfg.max_body, default_max_tokens=cfg.default_max_tokens))
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=int(cfg.grace_s + WRITE_S),
                            access_log=cfg.log_level == "debug")
    return _Server(config, scheduler, cfg.grace_s), engine, scheduler


def compile_warm(served: ServedModel, max_batch: int) -> None:
    """--compile: compile the AR model's decode graph before serving, for one row and for a
    full wave (the second shape makes the graph's batch and cache sizes dynamic, so later waves
    do not compile), and a feedback student's K-Forcing window graph (compile_decoders)
    likewise."""
    t0 = time.perf_counter()
    compile_decoders(served.model, served.ar_model)
    feedback = served.kind == "feedback"
    for b in sorted({1, max_batch}):
        generate_ar(served.ar_model, [[0]] * b, 2, stop_at_eos=False)
        if feedback:
            k = served.model.config.max_k
            generate(served.model, [[0]] * b, 2 * k, mode="kforcing", k=k, stop_at_eos=False)
    log.warning("compiled the decode graph in %.0f s", time.perf_counter() - t0)


def serve(cfg: ServeConfig, sock: socket.socket | None = None) -> None:
    """Run until SIGTERM / SIGINT. sock: an already bound socket (tests bind port 0)."""
    server, engine, _ = build(cfg)
    info = engine.describe()
    host, port = sock.getsockname()[:2] if sock is not None else (cfg.host, cfg.port)
    print(f"kforcing serve: http://{host}:{port}/  model '{engine.served.name}' "
          f"({info['kind']}, modes {', '.join(info['modes'])}, default mode {info['default_mode']}"
          f", k {info['default_k']}, max batch {cfg.max_batch})", file=sys.stderr, flush=True)
    server.run(sockets=[sock] if sock is not None else None)
