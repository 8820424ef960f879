"""Helpers shared by test_serve.py and test_playground.py: tiny served models, a real uvicorn
server on a free loopback port in a thread, and a slow engine that records stop flags."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.io.checkpoint import save_model
from kforcing.io.tokenizers import eos_id
from kforcing.serving.app import ServerSettings, create_app
from kforcing.serving.engine import Engine, load_served
from kforcing.serving.scheduler import Plan, Scheduler, Wave
from kforcing.serving.server import _Server
from kforcing.students.pushforward import PushForward, StudentConfig
from kforcing.students.store import save_student

CONTEXT = 96
MAX_K = 4
# a minimal chat template in the Hugging Face format (rendered by kforcing.io.hub.render_chat)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def make_models(root: Path, tokenizer_path: Path, tokenizer) -> tuple[Path, Path]:
    """(teacher dir with a chat template, teacher-preserving student dir with max_k 4)."""
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size(),
                             max_seq_len=CONTEXT, eos_id=eos_id(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = Transformer(cfg).eval()
        student = PushForward(teacher, StudentConfig(max_k=MAX_K,
                                                     layout="teacher-preserving")).eval()
    tdir, sdir = root / "teacher", root / "student"
    save_model(teacher, tdir, tokenizer=tokenizer_path)
    (tdir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}))
    save_student(student, sdir, tdir)
    return tdir, sdir


class ServerThread:
    """A real uvicorn server (the one `kforcing serve` runs) on 127.0.0.1:<free port>."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, grace_s: float = 30.0,
                 settings: ServerSettings | None = None):
        self.engine = engine
        self.scheduler = Scheduler(engine, max_batch)
        app = create_app(engine, self.scheduler, settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning",
                                timeout_graceful_shutdown=int(grace_s + 5))
        self.server = _Server(config, self.scheduler, grace_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class SlowEngine(Engine):
    """The real engine's checks and planning, with a fake decoder: row b's token j is a pure
    function of (seed, j), one token per step, `delay` seconds per step. Records the stop flags
    on_tokens returned and how many steps each wave ran."""

    def __init__(self, served, *, delay: float = 0.02, gate: threading.Event | None = None,
                 **kw):
        super().__init__(served, **kw)
        self.delay, self.gate = delay, gate
        self.stops: list[list[bool]] = []
        self.steps: list[int] = []
        self.waves: list[Wave] = []

    def decode(self, wave: Wave, plan: Plan, on_tokens) -> None:
        self.waves.append(wave)
        if self.gate is not None:
            self.gate.wait(30)
        vocab = self.served.tokenizer.get_vocab_size()
        done = [False] * len(wave.prompts)
        steps = 0
        for j in range(wave.max_new_tokens):
            time.sleep(self.delay)
            new = [[] if d else [(s * 7919 + j * 104729) % (vocab - 10) + 10]
                   for s, d in zip(wave.seeds, done, strict=True)]
            flags = on_tokens(new) or [False] * len(new)
            self.stops.append(list(flags))
            done = [d or f for d, f in zip(done, flags, strict=True)]
            steps += 1
            if all(done):
                break
        self.steps.append(steps)


def served(path: Path, name: str | None = None):
    return load_served(path, name=name)
