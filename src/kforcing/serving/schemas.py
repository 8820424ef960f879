"""Request bodies of the OpenAI-compatible endpoints, checked field by field.

Every problem becomes an `APIError` with the HTTP status and the one-line message the client
sees in an OpenAI-style error body ({"error": {"message", "type", "param", "code"}}). Checks that
need the model (context, max_k, modes) or the tokenized prompt happen later, in the app.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MODES = ("ar", "kforcing", "lossless")
MAX_STOP = 4                      # stop sequences per request, as the OpenAI API allows
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 413: "invalid_request_error",
               503: "service_unavailable", 500: "server_error"}

# fields the OpenAI API defines that we do not implement: refused unless sent at their no-op
# value, because silently ignoring them would change what the client gets
_UNSUPPORTED: dict[str, Any] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}
# fields accepted and ignored (they do not change the output)
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


class APIError(Exception):
    """A request the server refuses: HTTP status, one-line message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


@dataclass(frozen=True)
class KForcingOptions:
    """The extra body field {"kforcing": {...}}; None = the server's flag."""
    mode: str | None = None
    k: int | str | None = None            # an int, or "auto"
    ignore_eos: bool = False              # benchmarks: always emit max_tokens tokens


@dataclass
class GenerationRequest:
    """What /v1/completions and /v1/chat/completions share after parsing."""
    model: str
    max_tokens: int | None                # None: as many as the context allows (capped)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    kforcing: KForcingOptions = field(default_factory=KForcingOptions)
    prompt: str | None = None                               # completions
    messages: list[dict[str, str]] | None = None            # chat

    @property
    def chat(self) -> bool:
        return self.messages is not None


def parse_completion(body: Any) -> GenerationRequest:
    body = _object(body)
    _known(body, {"prompt", "max_tokens"})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise APIError(400, "missing required field 'prompt'", "prompt")
    if isinstance(prompt, list):
        raise APIError(400, "'prompt' must be one string: send one request per prompt "
                       "(token-id and batched prompts are not supported)", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", "prompt")
    req = _common(body, max_tokens=_max_tokens(body, "max_tokens", default=16))
    req.prompt = prompt
    return req


def parse_chat(body: Any) -> GenerationRequest:
    body = _object(body)
    _known(body, {"messages", "max_tokens", "max_completion_tokens"})
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "missing required field 'messages'", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    messages = [_message(m, i) for i, m in enumerate(msgs)]
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    req = _common(body, max_tokens=_max_tokens(body, name, default=None))
    req.messages = messages
    return req


# -- fields -------------------------------------------------------------------------------------

_COMMON = {"model", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
           "kforcing"}


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _known(body: dict[str, Any], own: set[str]) -> None:
    for name, value in body.items():
        if name in _UNSUPPORTED:
            if value not in _UNSUPPORTED[name]:
                raise APIError(400, f"'{name}' is not supported by this server", name)
        elif name not in own | _COMMON | _IGNORED:
            raise APIError(400, f"unknown field '{name}'", name)


def _common(body: dict[str, Any], max_tokens: int | None) -> GenerationRequest:
    model = body.get("model")
    if model is None:
        raise APIError(400, "missing required field 'model'", "model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' must be a non-empty string", "model")
    n = body.get("n")
    if n is not None and (_int(n, "n") != 1):
        raise APIError(400, f"n={n} is not supported: this server returns one choice per "
                       "request; send n requests with different seeds", "n")
    stream = _bool(body.get("stream", False), "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with stream=true",
                           "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise APIError(400, "'stream_options' must be {\"include_usage\": bool}",
                           "stream_options")
        include_usage = _bool(opts.get("include_usage", False), "stream_options.include_usage")
    temperature = _number(body.get("temperature", 1.0), "temperature")
    if temperature < 0:
        raise APIError(400, f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _number(body.get("top_p", 1.0), "top_p")
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = body.get("seed")
    seed = None if seed is None else _int(seed, "seed")
    return GenerationRequest(model=model, max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, stop=_stop(body.get("stop")), stream=stream,
                             include_usage=include_usage,
                             kforcing=_kforcing(body.get("kforcing")))


def _max_tokens(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    value = _int(value, name)
    if value <= 0:
        raise APIError(400, f"{name} must be >= 1, got {value}", name)
    return value


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(400, f"{where} must be an object with a 'role' and a 'content'",
                       "messages")
    if m["role"] not in ("system", "developer", "user", "assistant"):
        raise APIError(400, f"{where}.role '{m['role']}' is not one of system, developer, "
                       "user, assistant", "messages")
    content = m.get("content")
    if isinstance(content, list):      # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"{where}.content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string", "messages")
    role = "system" if m["role"] == "developer" else m["role"]
    return {"role": role, "content": content}


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}",
                       "stop")
    return stops


def _kforcing(value: Any) -> KForcingOptions:
    if value is None:
        return KForcingOptions()
    if not isinstance(value, dict):
        raise APIError(400, "'kforcing' must be an object like {\"mode\": \"lossless\", "
                       "\"k\": 4}", "kforcing")
    unknown = sorted(set(value) - {"mode", "k", "ignore_eos"})
    if unknown:
        raise APIError(400, f"unknown field 'kforcing.{unknown[0]}' (known: mode, k, "
                       "ignore_eos)", "kforcing")
    mode = value.get("mode")
    if mode is not None and mode not in MODES:
        raise APIError(400, f"kforcing.mode must be one of {', '.join(MODES)}, got {mode!r}",
                       "kforcing.mode")
    k = value.get("k")
    if k is not None and k != "auto":
        k = _int(k, "kforcing.k")
        if k < 1:
            raise APIError(400, f"kforcing.k must be >= 1 or \"auto\", got {k}", "kforcing.k")
    return KForcingOptions(mode=mode, k=k,
                           ignore_eos=_bool(value.get("ignore_eos", False), "kforcing.ignore_eos"))


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {value!r}", name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {value!r}", name)
    return value
