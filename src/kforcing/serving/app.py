"""The HTTP API: OpenAI-compatible routes on FastAPI, streamed as server-sent events.

    GET  /                      the playground page (plain HTML/JS, no build step, no CDN)
    GET  /health                liveness, queue length; 503 while shutting down
    GET  /v1/models             the one served model (+ its K-Forcing capabilities)
    POST /v1/completions        prompt -> text
    POST /v1/chat/completions   messages -> the model's chat template -> text

Every refusal is an OpenAI-style error body with one message (schemas.APIError); nothing a
client sends produces a 500. Requests go to the scheduler, which batches them into waves.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from kforcing.errors import KForcingError
from kforcing.serving.config import DEFAULT_MAX_TOKENS, MAX_BODY
from kforcing.serving.engine import Engine
from kforcing.serving.scheduler import Event, Job, Scheduler, WaveKey
from kforcing.serving.schemas import (
    APIError,
    GenerationRequest,
    error_body,
    parse_chat,
    parse_completion,
)
from kforcing.serving.text import TextStream

log = logging.getLogger("kforcing.serve")

DISCONNECT_POLL_S = 0.5             # non-streamed requests: how often to look for a gone client


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body: int = MAX_BODY
    default_max_tokens: int = DEFAULT_MAX_TOKENS


def create_app(engine: Engine, scheduler: Scheduler,
               settings: ServerSettings | None = None) -> FastAPI:
    """The app; its lifespan starts the scheduler's decode thread and stops it at shutdown."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.drain(0.0)
        await asyncio.to_thread(scheduler.close, 10.0)

    app = FastAPI(title="kforcing", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    api = _Api(engine, scheduler, settings)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(KForcingError)
    async def user_error(request: Request, e: KForcingError) -> JSONResponse:
        # the library's user errors (a chat template refusing the messages, ...) are the
        # client's here
        return JSONResponse(error_body(400, " ".join(str(e).split())), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}" if e.status_code in (404, 405)
                   else str(e.detail))
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = resources.files("kforcing.serving").joinpath("static/playground.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "draining" if scheduler.draining else "ok",
                "model": engine.served.name, "pending": scheduler.pending,
                "running": len(scheduler.running), "waves": scheduler.waves}
        if auto := engine.auto_summary():
            body["k_auto"] = auto
        return JSONResponse(body, status_code=503 if scheduler.draining else 200)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        api.authorize(request)
        return JSONResponse({"object": "list", "data": [api.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        api.authorize(request)
        api.check_model(model_id)
        return JSONResponse(api.model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.generate(request, chat=True)

    return app


class _Api:
    def __init__(self, engine: Engine, scheduler: Scheduler, settings: ServerSettings):
        self.engine, self.scheduler, self.settings = engine, scheduler, settings
        self.served = engine.served
        self.created = int(time.time())

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.served.name:
            raise APIError(404, f"model '{name}' not found: this server serves "
                           f"'{self.served.name}'", "model", "model_not_found")

    def model_card(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": self.created,
                "owned_by": "kforcing", "kforcing": self.engine.describe()}

    async def read_json(self, request: Request):
        limit = self.settings.max_body
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes exceeds the limit of "
                           f"{limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                               code="request_too_large")
        if not body:
            raise APIError(400, "empty request body: send a JSON object")
        try:
            return json.loads(body)
        except UnicodeDecodeError:
            raise APIError(400, "malformed JSON body: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"malformed JSON body: {e.msg} at line {e.lineno} column "
                           f"{e.colno}") from None

    # -- generation -------------------------------------------------------------------------------
    async def generate(self, request: Request, chat: bool) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        req = parse_chat(body) if chat else parse_completion(body)
        self.check_model(req.model)
        job = self.make_job(req)
        self.scheduler.submit(job)
        reply = _Reply(self.served.name, chat, job, req.include_usage)
        if req.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await reply.whole(request)

    def make_job(self, req: GenerationRequest) -> Job:
        """Check the request against the model, tokenize it, and turn it into a job."""
        eng, served = self.engine, self.served
        opts = req.kforcing
        mode = opts.mode or eng.mode
        k = 1 if mode == "ar" else (opts.k if opts.k is not None else eng.k)
        eng.check(mode, k, temperature=req.temperature, top_p=req.top_p)
        ids = served.encode_chat(req.messages) if req.chat else served.encode_prompt(req.prompt)
        field = "messages" if req.chat else "prompt"
        if not ids:
            raise APIError(400, f"the {field} encodes to no tokens", field)
        usable = eng.usable_context(mode, k)
        why = "" if usable == served.context else (
            f" (the model's context of {served.context} minus the "
            f"{served.context - usable} positions mode '{mode}' with k={k} reserves)")
        if len(ids) >= usable:
            raise APIError(400, f"the {field} has {len(ids)} tokens; it must be shorter than the "
                           f"usable context of {usable} tokens{why}", field,
                           "context_length_exceeded")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, usable - len(ids))
        if len(ids) + max_tokens > usable:
            raise APIError(400, f"max_tokens={max_tokens} plus the {field}'s {len(ids)} tokens "
                           f"exceeds the usable context of {usable} tokens{why}", "max_tokens",
                           "context_length_exceeded")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        stop_at_eos = not opts.ignore_eos
        text = TextStream(served.decode, max_tokens=max_tokens, stop=req.stop,
                          stop_ids=served.stop_ids if stop_at_eos else frozenset())
        key = WaveKey(mode=mode, k=k, temperature=req.temperature, top_p=req.top_p,
                      stop_at_eos=stop_at_eos)
        return Job(prompt=ids, seed=seed, key=key, text=text, usable_context=usable,
                   loop=asyncio.get_running_loop())


class _Reply:
    """One job's events as an OpenAI response: whole, or as server-sent event chunks."""

    def __init__(self, model: str, chat: bool, job: Job, include_usage: bool):
        self.model, self.chat, self.job, self.include_usage = model, chat, job, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def usage(self) -> dict:
        n, p = len(self.job.text.tokens), len(self.job.prompt)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    async def whole(self, request: Request) -> Response:
        parts = []
        while True:
            try:
                event = await asyncio.wait_for(self.job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.job.cancel()
                    return Response(status_code=499)
                continue
            if event.kind == "error":
                raise event.error
            if event.kind == "end":
                break
            parts.append(event.text)
        text, reason = "".join(parts), self.job.text.finish_reason
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else
                             "text_completion", "created": self.created, "model": self.model,
                             "choices": [choice], "usage": self.usage(),
                             "kforcing": self.job.stats()})

    def _chunk(self, choices: list[dict], **extra) -> str:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else
               "text_completion", "created": self.created, "model": self.model,
               "choices": choices, **extra}
        if self.include_usage:
            obj.setdefault("usage", None)
        return f"data: {json.dumps(obj)}\n\n"

    def _choice(self, text: str | None, reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", **delta}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    async def stream(self) -> AsyncIterator[str]:
        """Chunks: (chat) a first delta with the role; one per decoder step that added text,
        with the request's tokens and passes so far; a last one with the finish_reason and the
        stats; with include_usage, a usage chunk with no choices; then [DONE]."""
        job = self.job
        try:
            if self.chat:
                yield self._chunk([self._choice("", None, role=True)])
            while True:
                event: Event = await job.events.get()
                if event.kind == "error":
                    yield f"data: {json.dumps(event.error.body())}\n\n"
                    break
                if event.kind == "end":
                    # without include_usage, the usage rides on the last chunk (every response
                    # reports it); with it, on its own final chunk as OpenAI sends it
                    last = {} if self.include_usage else {"usage": self.usage()}
                    yield self._chunk([self._choice(None, job.text.finish_reason)],
                                      kforcing=job.stats(), **last)
                    if self.include_usage:
                        yield self._chunk([], usage=self.usage(), kforcing=job.stats())
                    break
                yield self._chunk([self._choice(event.text, None)],
                                  kforcing={"tokens": event.tokens, "forward_passes": event.passes})
            yield "data: [DONE]\n\n"
        finally:
            if not job.done:
                job.cancel()       # the client went away: free its row
