"""`kforcing serve`: the official openai client against a real uvicorn server on a free loopback
port, with tiny models made here (issue 14), plus the scheduler and text-stream rules."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from _serve_util import (  # noqa: E402
    CONTEXT,
    MAX_K,
    ServerThread,
    SlowEngine,
    make_models,
    served,
)

from kforcing.cli import serve as cli_serve  # noqa: E402
from kforcing.core.model import Transformer  # noqa: E402
from kforcing.decoding import autok  # noqa: E402
from kforcing.decoding import generate as generate_module  # noqa: E402
from kforcing.decoding.feedback_window import WindowGraph  # noqa: E402
from kforcing.errors import KForcingError  # noqa: E402
from kforcing.io.checkpoint import load_model  # noqa: E402
from kforcing.serving import bench  # noqa: E402
from kforcing.serving.app import ServerSettings  # noqa: E402
from kforcing.serving.config import ROW_KEYS, BenchServeConfig  # noqa: E402
from kforcing.serving.engine import Engine  # noqa: E402
from kforcing.serving.scheduler import Job, Plan, Scheduler, WaveKey  # noqa: E402
from kforcing.serving.schemas import MODES  # noqa: E402
from kforcing.serving.server import compile_warm  # noqa: E402
from kforcing.serving.text import TextStream  # noqa: E402
from kforcing.students.feedback import FeedbackConfig, FeedbackStudent, save_feedback  # noqa: E402
from kforcing.students.pushforward import PushForward, StudentConfig  # noqa: E402
from kforcing.students.store import save_student  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def model_dirs(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("served"), tiny_corpus.tokenizer_path,
                       tiny_tokenizer)


@pytest.fixture(scope="module")
def student(model_dirs):
    return served(model_dirs[1])


@pytest.fixture(scope="module")
def server(student):
    """A real student server (modes ar, kforcing, lossless) behind an API key."""
    with ServerThread(Engine(student), max_batch=8,
                      settings=ServerSettings(api_key=KEY, max_body=4096)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(server, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                   **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else {}


# -- the API through the official client ---------------------------------------------------------

def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["student"]
    info = models[0].model_extra["kforcing"]
    assert info["max_k"] == MAX_K and info["modes"] == ["ar", "kforcing", "lossless"]
    assert info["context"] == CONTEXT and info["chat_template"]
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("mode", ["ar", "kforcing", "lossless"])
def test_completion_stream_equals_whole(client, mode):
    kw = {"model": "student", "prompt": "The river", "max_tokens": 12, "seed": 7,
          "extra_body": {"kforcing": {"mode": mode, "ignore_eos": True}}}
    whole = client.completions.create(**kw)
    assert whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens + 12 == whole.usage.total_tokens
    stats = whole.model_extra["kforcing"]
    assert stats["mode"] in (mode, "ar") and stats["seed"] == 7 and stats["forward_passes"] >= 1
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    _check_chunk_rules(chunks, whole.usage)


def _check_chunk_rules(chunks, usage) -> None:
    assert len({c.id for c in chunks}) == 1                       # one id in every chunk
    with_choices = [c for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] in ("stop", "length") and not any(reasons[:-1])
    last = chunks[-1]                                             # include_usage: the last chunk
    assert last.choices == [] and last.usage.completion_tokens == usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_rules(client):
    kw = {"model": "student", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Tell me a story."}],
          "max_tokens": 10, "seed": 3, "extra_body": {"kforcing": {"mode": "lossless"}}}
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    _check_chunk_rules(chunks, whole.usage)


def test_lossless_text_is_ar_text(client):
    """Lossless decoding spends the same noise as AR sampling of the teacher: same text."""
    texts = {m: client.completions.create(
        model="student", prompt="She opened the letter", max_tokens=16, seed=11,
        extra_body={"kforcing": {"mode": m}}).choices[0].text for m in ("ar", "lossless")}
    assert texts["ar"] == texts["lossless"]


def test_stop_sequence(client):
    base = client.completions.create(model="student", prompt="The", max_tokens=20, seed=5,
                                     extra_body={"kforcing": {"mode": "ar"}})
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop sequence"
    cut = client.completions.create(model="student", prompt="The", max_tokens=20, seed=5,
                                    stop=[stop], extra_body={"kforcing": {"mode": "ar"}})
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_batch_independence(student):
    """N concurrent requests, batched into one wave, give exactly what each gives alone."""
    reqs = [("The river", 9, 1), ("In the morning the village was", 14, 2),
            ("She", 6, 3), ("The old man remembered the quiet green garden", 11, 4)]
    for mode, k in (("ar", None), ("kforcing", 2), ("lossless", 3)):
        gate = threading.Event()
        gate.set()
        engine = _GatedEngine(student, gate)
        with ServerThread(engine, max_batch=8) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

            def ask(r, c=c, mode=mode, k=k):
                kf = {"mode": mode} if k is None else {"mode": mode, "k": k}
                out = c.completions.create(model="student", prompt=r[0], max_tokens=r[1],
                                           seed=r[2], extra_body={"kforcing": kf})
                return out.choices[0].text, out.model_extra["kforcing"]["batch_size"]

            alone = [ask(r) for r in reqs]
            assert all(b == 1 for _, b in alone)
            gate.clear()                     # hold the decode thread on a first request ...
            with ThreadPoolExecutor(len(reqs) + 1) as pool:
                blocker = pool.submit(ask, ("The", 2, 99))
                _wait(lambda e=engine: e.waiting)
                futures = [pool.submit(ask, r) for r in reqs]
                _wait(lambda s=srv: s.scheduler.pending == len(reqs))
                gate.set()                   # ... so that the others wait, then form one wave
                together = [f.result() for f in futures]
                blocker.result()
        assert [b for _, b in together] == [len(reqs)] * len(reqs), mode
        assert [t for t, _ in together] == [t for t, _ in alone], mode


class _GatedEngine(Engine):
    def __init__(self, served, gate):
        super().__init__(served)
        self.gate, self.waiting = gate, False

    def decode(self, wave, plan, on_tokens):
        self.waiting = True
        self.gate.wait(30)
        self.waiting = False
        super().decode(wave, plan, on_tokens)


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- refusals: 4xx with one message, never a 500 ------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"max_tokens": CONTEXT}, "exceeds the usable context"),
    ({"prompt": "the " * (CONTEXT + 10)}, "usable context"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"temperature": 0, "extra_body": {"kforcing": {"mode": "kforcing"}}}, "temperature 0"),
    ({"extra_body": {"kforcing": {"k": MAX_K + 1}}}, f"exceeds this checkpoint's max_k={MAX_K}"),
    ({"extra_body": {"kforcing": {"mode": "fast"}}}, "kforcing.mode must be one of"),
    ({"n": 2}, "n=2 is not supported"),
    ({"top_p": 0.5, "extra_body": {"kforcing": {"mode": "kforcing"}}}, "top_p=0.5"),
    ({"logprobs": 2}, "'logprobs' is not supported"),
    ({"extra_body": {"prompt": None}}, "missing required field 'prompt'"),
])
def test_bad_requests(client, kw, words):
    args = {"model": "student", "prompt": "The river", "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400
    assert words in e.value.body["message"]
    assert "\n" not in e.value.body["message"]


def test_unknown_model_and_keys(server, client):
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    missing = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0,
                            default_headers={"Authorization": ""})
    for bad in (wrong, missing):
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="student", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_raw_http_errors(server):
    status, body = raw(server, "POST", "/v1/completions", b'{"model": "student", "prompt": ',
                       {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["message"].startswith("malformed JSON body")
    status, body = raw(server, "POST", "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/completions", b"")
    assert status == 400 and "empty request body" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/completions", b"x" * 5000)
    assert status == 413 and "limit of 4096 bytes" in body["error"]["message"]
    status, body = raw(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["message"] == "no route GET /v1/nothing"
    status, body = raw(server, "POST", "/v1/chat/completions",
                       json.dumps({"model": "student", "messages": []}).encode())
    assert status == 400 and "'messages' must be a non-empty list" in body["error"]["message"]


def test_playground_page_is_served(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    page = r.read().decode()
    assert r.status == 200 and "text/html" in r.getheader("content-type")
    assert 'id="out-ar"' in page and 'id="out-kf"' in page and "http" not in page.split(
        "<script>")[0].replace("http-equiv", "")      # nothing fetched from elsewhere


# -- rows leave: client disconnect, SIGTERM -----------------------------------------------------

def test_client_disconnect_frees_its_row(student):
    engine = SlowEngine(student, delay=0.02)
    with ServerThread(engine) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        body = {"model": "student", "prompt": "The", "max_tokens": 60, "stream": True,
                "kforcing": {"mode": "ar"}}
        conn.request("POST", "/v1/completions", json.dumps(body))
        r = conn.getresponse()
        assert r.status == 200
        assert r.readline().startswith(b"data: ")
        conn.sock.shutdown(2)
        conn.close()
        _wait(lambda: engine.steps, timeout=10)
    assert engine.steps[0] < 60                 # the row stopped early ...
    assert engine.stops[engine.steps[0] - 1] == [True]    # ... because on_tokens said so


def test_sigterm_finishes_in_flight_and_refuses_new(student):
    engine = SlowEngine(student, delay=0.01)
    srv = ServerThread(engine, grace_s=30)
    with srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "student", "prompt": "The", "max_tokens": 50, "stream": True,
             "kforcing": {"mode": "ar"}}))
        r = conn.getresponse()
        first = r.readline()
        srv.server.handle_exit(signal.SIGTERM, None)       # what uvicorn's handler calls
        rest = r.read().decode()
        lines = [ln for ln in (first.decode() + rest).splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        final = json.loads(lines[-2][6:])
        assert final["choices"][0]["finish_reason"] == "length"
        assert final["kforcing"]["forward_passes"] == 50            # it ran to its end
        srv.thread.join(20)
        assert not srv.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5).request("GET", "/health")


def test_sigterm_grace_ends_long_requests(student):
    engine = SlowEngine(student, delay=0.05)
    with ServerThread(engine, grace_s=0.3) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "student", "prompt": "The", "max_tokens": 80, "kforcing": {"mode": "ar"}}))
        _wait(lambda: srv.scheduler.running)
        t0 = time.monotonic()
        srv.server.handle_exit(signal.SIGTERM, None)
        r = conn.getresponse()
        body = json.loads(r.read())
        assert time.monotonic() - t0 < 5
    assert r.status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["kforcing"]["note"] == "server shutdown"
    assert body["usage"]["completion_tokens"] < 80


def test_serve_command_binds_loopback_and_exits_on_sigterm(model_dirs):
    port = bench.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kforcing.cli.serve", "serve", "--model",
                             str(model_dirs[0]), "--port", str(port), "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        bench.wait_healthy(f"http://127.0.0.1:{port}", proc, 60)
        with pytest.raises(OSError):    # not on another address of this machine
            http.client.HTTPConnection("127.0.0.2", port, timeout=2).request("GET", "/health")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0
    assert f"http://127.0.0.1:{port}/" in proc.stderr.read()


# -- the scheduler and the text rules, without HTTP ----------------------------------------------

def test_waves_group_settings_and_respect_max_batch_and_context(student):
    engine = SlowEngine(student, delay=0.0)
    sched = Scheduler(engine, max_batch=3)
    loop = asyncio.new_event_loop()
    key_a = WaveKey("ar", 1, 1.0, 1.0, True)
    key_b = WaveKey("ar", 1, 0.5, 1.0, True)

    def job(key, prompt_len=2, max_tokens=4, usable=CONTEXT):
        return Job(prompt=[5] * prompt_len, seed=1, key=key,
                   text=TextStream(lambda ids: "x" * len(ids), max_tokens=max_tokens),
                   usable_context=usable, loop=loop)

    jobs = [job(key_a), job(key_b), job(key_a), job(key_a), job(key_a),
            job(key_a, prompt_len=80, max_tokens=4, usable=90),       # fits alone ...
            job(key_a, prompt_len=4, max_tokens=20, usable=90)]       # ... not with this one
    for j in jobs:
        sched.submit(j)
    sched.start()
    sched.close(timeout=20)
    loop.close()
    sizes = [(len(w.prompts), w.key.temperature) for w in engine.waves]
    assert sizes == [(3, 1.0), (1, 0.5), (2, 1.0), (1, 1.0)]
    assert all(j.done and len(j.text.tokens) == j.text.max_tokens for j in jobs)
    with pytest.raises(Exception, match="shutting down"):
        sched.submit(job(key_a))


def test_text_stream_stop_sequences_and_partial_characters():
    pieces = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "\ufffd", 6: "é", 9: ""}

    def decode(ids):      # token 5 + 6 are one character split over two tokens
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    ts = TextStream(decode, max_tokens=10, stop=["o w"])
    assert ts.feed([1, 2]).text == "Hell"           # "o" could start "o w": held back
    d = ts.feed([3, 4])
    assert (d.text, d.finish_reason) == ("", "stop") and ts.sent == "Hell"
    ts = TextStream(decode, max_tokens=3, stop_ids={9})
    assert ts.feed([1, 5]).text == "Hel"            # half a character is held back
    d = ts.feed([6, 2])                             # max_tokens=3 reached inside this step
    assert (d.text, d.finish_reason) == ("é", "length") and ts.tokens == [1, 5, 6]
    ts = TextStream(decode, max_tokens=10, stop_ids={9})
    d = ts.feed([1, 9, 2])
    assert (d.text, d.finish_reason, ts.tokens) == ("Hel", "stop", [1, 9])


# -- bench-serve at tiny scale ---------------------------------------------------------------

def test_bench_serve_rows(student, tmp_path):
    cfg = BenchServeConfig(modes=("ar", "kforcing", "lossless"), concurrency=(1, 4),
                           requests=7, max_tokens=6, warmup=1, rounds=2)
    with ServerThread(Engine(student), max_batch=8) as srv:
        rows = bench.bench_serve(srv.url, "student", cfg)
    assert [(r["mode"], r["concurrency"]) for r in rows] == [
        (m, c) for m in cfg.modes for c in cfg.concurrency]
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        assert (r["requests"], r["errors"], r["lost"], r["truncated"]) == (7, 0, 0, 0), r
        assert r["rounds"] == 2
        assert r["tokens_per_s"] > 0 and r["p50_ms"] <= r["p95_ms"]
    with pytest.raises(KForcingError, match="rounds must be"):
        BenchServeConfig(requests=3, rounds=4)
    bench.write_rows(tmp_path / "serve.json", rows, {"command": "test"})
    assert json.loads((tmp_path / "serve.json").read_text()) == rows


def test_cli_parsers():
    import argparse
    p = argparse.ArgumentParser()
    cli_serve.add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["serve", "--model", "m", "--k", "auto", "--max-batch", "4"])
    assert (args.host, args.port, args.k, args.max_batch) == ("127.0.0.1", 8000, "auto", 4)
    args = p.parse_args(["bench-serve", "--model", "m"])
    assert args.concurrency == "1,4,8,32,128" and args.requests == 500
    assert cli_serve.main(["bench-serve"]) == 1          # neither --model nor --url


def test_a_stopped_row_stops_the_decoder(student, client):
    """With on_tokens, a row that hits its stop sequence leaves the wave at once: the teacher
    runs fewer forward passes than max_tokens."""
    kw = {"model": "student", "prompt": "The", "max_tokens": 40, "seed": 5,
          "extra_body": {"kforcing": {"mode": "ar"}}}
    text = client.completions.create(**kw).choices[0].text
    stop = text[6:8]
    assert stop.strip() and text.index(stop) < 20
    calls = []
    hook = student.ar_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = client.completions.create(stop=[stop], **kw)
    finally:
        hook.remove()
    assert out.choices[0].finish_reason == "stop"
    assert len(calls) < 40


# -- every student design, and --k auto ----------------------------------------------------------

def test_every_student_design_serves_every_mode(model_dirs, tmp_path):
    """A shared-layout PushForward student (its teacher loaded beside it) and a feedback
    student: lossless text is the teacher's AR text; K-Forcing emits k tokens per pass."""
    teacher = load_model(model_dirs[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        save_student(PushForward(teacher, StudentConfig(max_k=3, layout="shared")).eval(),
                     tmp_path / "shared", model_dirs[0])
        save_feedback(FeedbackStudent(teacher, FeedbackConfig(max_k=3)).eval(),
                      tmp_path / "feedback", model_dirs[0])
    for name in ("shared", "feedback"):
        with ServerThread(Engine(served(tmp_path / name))) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            out = {m: c.completions.create(
                model=name, prompt="The river", max_tokens=9, seed=4,
                extra_body={"kforcing": {"mode": m, "ignore_eos": True}}) for m in MODES}
        assert out["lossless"].choices[0].text == out["ar"].choices[0].text, name
        stats = out["kforcing"].model_extra["kforcing"]
        assert (stats["k"], stats["forward_passes"]) == (3, 3), name


def test_compile_warm_compiles_ar_steps_and_feedback_windows(model_dirs, tmp_path,
                                                             monkeypatch):
    """serve --compile: before serving, the AR model's graph has run AR steps and a feedback
    student's K-Forcing window graph whole windows, each at one row and at a full wave, and the
    draft's steps are compiled (stubs: the uncompiled static graphs, no draft graph; no C++
    compiler needed)."""
    shapes, windows = [], []

    def fake_window(student):
        graph = WindowGraph(student)

        def run(first, h, p, noise, *a):
            windows.append(tuple(noise.shape[:2]))
            return graph(first, h, p, noise, *a)
        object.__setattr__(student, "compiled_window", run)
        return student
    monkeypatch.setattr(generate_module, "compile_window", fake_window)

    def fake(self, **options):
        def graph(idx, *a):
            shapes.append(tuple(idx.shape))
            return self.decode_static(idx, *a)
        self.compiled_step = graph
        return self
    monkeypatch.setattr(Transformer, "compile_decode", fake)
    drafts = []
    monkeypatch.setattr(FeedbackStudent, "compile_draft", lambda self: drafts.append(self))
    teacher = load_model(model_dirs[0])
    save_feedback(FeedbackStudent(teacher, FeedbackConfig(max_k=3)).eval(),
                  tmp_path / "feedback", model_dirs[0])
    s = served(tmp_path / "feedback")
    compile_warm(s, 4)
    assert s.ar_model.compiled_step is not None and drafts == [s.model]
    assert set(shapes) == {(1, 1), (4, 1)} and set(windows) == {(1, 3), (4, 3)}


def test_k_auto_is_chosen_per_batch_size(student, monkeypatch):
    """--k auto: k from the calibration of the wave's batch-size bucket; where AR wins, a
    wave decodes as plain AR (a lossless wave then gives the same text anyway)."""
    calls = []

    def choose_k(model, batch_size, cache=None):
        calls.append(batch_size)
        return SimpleNamespace(k={1: 4, 2: 2}.get(batch_size, 1), reason="fake timer")

    monkeypatch.setattr(autok, "choose_k", choose_k)
    engine = Engine(student, k="auto")
    engine.warm_up(8)
    assert calls == [1, 2, 4, 8]
    key = WaveKey("lossless", "auto", 1.0, 1.0, True)
    assert [engine.plan(key, b) for b in (1, 2, 3, 8)] == [
        Plan("lossless", 4), Plan("lossless", 2), Plan("ar", 1), Plan("ar", 1)]
    assert engine.plan(WaveKey("kforcing", 3, 1.0, 1.0, True), 8) == Plan("kforcing", 3)
    assert calls == [1, 2, 4, 8]                 # calibrated once per bucket


def test_chat_template_refusal_is_a_400(student):
    strict = dataclasses.replace(student, chat={
        "chat_template": "{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                         "'no system messages') }}{% endif %}{{ messages[0]['content'] }}"})
    with ServerThread(Engine(strict)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no system messages"):
            c.chat.completions.create(model="student", max_tokens=2,
                                      messages=[{"role": "system", "content": "x"}])
        ok = c.chat.completions.create(model="student", max_tokens=2,
                                       messages=[{"role": "user", "content": "x"}])
    assert ok.usage.completion_tokens <= 2


def test_usage_without_include_usage(client):
    chunks = list(client.completions.create(model="student", prompt="The", max_tokens=5,
                                            seed=2, stream=True,
                                            extra_body={"kforcing": {"ignore_eos": True}}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
