"""Settings of `kforcing serve` and `kforcing bench-serve`, free of the server's optional
dependencies (fastapi, uvicorn, openai: the `serve` extra), so the command line can show them
and their defaults without importing those."""

from __future__ import annotations

from dataclasses import dataclass

from kforcing.errors import KForcingError

GRACE_S = 30.0          # SIGTERM: how long requests in flight may still run
MAX_BODY = 1 << 20      # bytes: a larger request body gets 413
DEFAULT_MAX_TOKENS = 256  # a request without max_tokens (chat): at most this many


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    mode: str | None = None              # default: "ar" for a teacher, "kforcing" for a student
    k: int | str | None = None           # default: the checkpoint's max_k; or "auto"
    max_batch: int = 32
    batch_wait_ms: float = 100.0         # longest wait for a wave to fill (scheduler.Scheduler)
    device: str = "cpu"
    name: str | None = None              # the model id clients send (default: directory name)
    grace_s: float = GRACE_S
    max_body: int = MAX_BODY
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    autok_cache: str | None = None
    log_level: str = "info"
    compile: bool = False                # AR steps through Transformer.compile_decode

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise KForcingError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise KForcingError(f"--batch-wait-ms must be in [0, 10000], got {self.batch_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise KForcingError(f"--port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise KForcingError("--api-key must not be empty")


PROMPTS = (
    "The river", "In the morning the village", "She opened the letter and",
    "The committee reported that", "He walked along the road until", "It was a quiet evening",
    "The old man remembered", "According to the report,",
)
# the keys every row of docs/results/serve.json has (issue 14)
ROW_KEYS = ("mode", "concurrency", "requests", "errors", "lost", "tokens_per_s", "p50_ms",
            "p95_ms", "ttft_p50_ms")


@dataclass
class BenchServeConfig:
    modes: tuple[str, ...] = ("ar", "kforcing", "lossless")
    concurrency: tuple[int, ...] = (1, 4, 8, 32, 128)
    requests: int = 500                # per (mode, concurrency) cell
    max_tokens: int = 64
    temperature: float = 1.0
    k: int | str | None = None         # per request; None: the server's --k
    warmup: int = 4                    # requests per mode before measuring
    rounds: int = 1                    # a concurrency's cells in rounds, modes taking turns
    timeout_s: float = 600.0           # one request
    prompts: tuple[str, ...] = PROMPTS

    def __post_init__(self) -> None:
        if self.requests < 1 or self.max_tokens < 1 or self.warmup < 0:
            raise KForcingError("bench-serve: requests and max_tokens must be >= 1, warmup >= 0")
        if not self.concurrency or min(self.concurrency) < 1:
            raise KForcingError(f"bench-serve: concurrency must be >= 1, got {self.concurrency}")
        if not self.prompts:
            raise KForcingError("bench-serve: no prompts")
        if not 1 <= self.rounds <= self.requests:
            raise KForcingError(f"bench-serve: rounds must be in [1, requests={self.requests}], "
                                f"got {self.rounds}")


