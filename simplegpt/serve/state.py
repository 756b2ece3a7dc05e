"""What every route shares: the server's Limits and its ServerState, which a route takes as a
parameter of type `State` (a FastAPI dependency that reads it from app.state.server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ..generation.engine import Engine
from ..generation.text import Result
from ..tokenizer import Tokenizer
from .errors import APIError
from .metrics import Metrics
from .params import Prompt, prompt_tokens
from .responses import usage
from .scheduler import Scheduler


@dataclass(frozen=True)
class Limits:
    """What the server takes, each with its default (see `simplegpt serve --help`).

    max_tokens: new tokens per sequence; max_rows: sequences (prompts x n) per request; max_batch:
    sequences decoded together; max_queue: sequences that may wait for a place (then 429);
    timeout: seconds a request may run (None: no limit; then it is cancelled: 504, or an error event
    when streamed); max_body: bytes of a request body (413); body_timeout: seconds to send it (408)."""

    max_tokens: int = 4096
    max_rows: int = 64
    max_batch: int = 16
    max_queue: int = 256
    timeout: float | None = 600.0
    max_body: int = 2 * 2**20
    body_timeout: float = 30.0


@dataclass
class ServerState:
    """One app's shared state: the engine it serves under model_name, its limits, the scheduler
    that runs its requests, its metrics, and the time it started (Unix seconds: the model card's
    `created`)."""

    engine: Engine
    model_name: str
    limits: Limits
    scheduler: Scheduler
    metrics: Metrics
    created: int

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def window(self) -> int:
        """The model's context, in tokens."""
        return self.engine.window

    def check_model(self, name: str) -> None:
        """A 404 for a model name other than the one served."""
        if name != self.model_name:
            raise APIError(f"the model '{name}' does not exist; this server serves '{self.model_name}'", status=404,
                           param="model", code="model_not_found")

    def check_rows(self, rows: list[Prompt]) -> list[Prompt]:
        """rows (a request's prompts x n), or a 400 when they are more than the server takes."""
        if len(rows) > self.limits.max_rows:
            raise APIError(f"{len(rows)} sequences (prompts x n) in one request; the server takes at most "
                           f"{self.limits.max_rows}", param="n")
        return rows

    def token_rows(self, rows: list[Prompt], truncate: int | None, param: str = "prompt") -> list[list[int]]:
        """Each row as token ids, checked against the context (params.prompt_tokens)."""
        return [prompt_tokens(self.tokenizer, p, self.window, truncate, param) for p in rows]

    def count(self, results: list[Result], n: int) -> None:
        """A finished request's tokens, in and out, added to the metrics."""
        u = usage(results, n)
        self.metrics.prompt_tokens.inc(u["prompt_tokens"])
        self.metrics.generated_tokens.inc(u["completion_tokens"])


async def server_state(request: Request) -> ServerState:
    # async: a plain function would be run in the thread pool, a hop per request
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]
