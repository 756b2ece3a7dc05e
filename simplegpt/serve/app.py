"""create_app: the FastAPI app over an engine, from its ServerState, its middleware and its routers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..generation.engine import Engine
from .errors import add_error_handlers
from .guard import Guard
from .metrics import Metrics
from .routes import ROUTERS
from .scheduler import Scheduler
from .state import Limits, ServerState


def create_app(engine: Engine, model_name: str, limits: Limits = Limits(), *, cors_origins: Sequence[str] = (),
               api_keys: Sequence[str] = (), allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (see simplegpt.serve), its requests run
    together in one continuously batched decode (serve.scheduler); its ServerState is app.state.server.
    limits: every limit the server sets (Limits). cors_origins: web origins (e.g. http://localhost:3000,
    or "*") whose pages may call the API from a browser; none by default. api_keys: keys a request to /v1
    or /metrics must send as a bearer token (none: open). allowed_hosts: the names the Host header may
    give (None: any). Raises ValueError for an engine without a tokenizer."""
    if engine.tokenizer is None:
        raise ValueError("serving needs a model with a tokenizer (text in, text out)")
    scheduler = Scheduler(engine, limits.max_batch, limits.max_queue, limits.timeout)
    metrics = Metrics(lambda: scheduler.queued, lambda: scheduler.running, limits.max_batch)
    # No /docs or /redoc pages: they load their scripts from a CDN; /openapi.json needs the key (guard.PROTECTED).
    app = FastAPI(title="simplegpt", description="An OpenAI-compatible API over a simplegpt model.",
                  lifespan=closing_scheduler, docs_url=None, redoc_url=None)
    app.state.server = ServerState(engine, model_name, limits, scheduler, metrics, created=int(time.time()))
    app.add_middleware(Guard, api_keys=api_keys, allowed_hosts=allowed_hosts, max_body=limits.max_body,
                       body_timeout=limits.body_timeout, on_done=metrics.request_done)
    if cors_origins:  # outside the guard: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


@contextlib.asynccontextmanager
async def closing_scheduler(app: FastAPI):
    """The app's lifespan: its scheduler stops (what still runs is cancelled) when the server does."""
    yield
    app.state.server.scheduler.close(timeout=10)
