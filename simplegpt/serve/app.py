"""The FastAPI app: its routes, each a thin step from a request body to the engine and back."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, StreamingResponse

from ..engine import FINISH_LENGTH, Engine, Result, TokenLogprobs
from .chat import CHAT_STOP, DEFAULT_CHAT_MAX_TOKENS, chat_prompt
from .errors import APIError, add_error_handlers
from .params import Prompt, logprobs_count, prompt_list, refuse_unsupported, sampling_params
from .responses import chat_logprobs, completion_logprobs, model_card, sse, usage
from .scheduler import Scheduler
from .schemas import ChatRequest, CompletionRequest

STATIC = Path(__file__).parent.parent / "static"


def create_app(engine: Engine, model_name: str, max_tokens: int = 4096, max_rows: int = 64,
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (see simplegpt.serve). A request may ask
    for at most max_tokens new tokens per sequence and max_rows sequences (prompts x n): a
    generation holds the server while it runs. cors_origins: web origins (e.g.
    http://localhost:3000, or "*") whose pages may call the API from a browser; none by default.
    Raises ValueError for an engine without a tokenizer."""
    if engine.tokenizer is None:
        raise ValueError("serving needs a model with a tokenizer (text in, text out)")
    tokenizer = engine.tokenizer
    scheduler = Scheduler(engine)
    created = int(time.time())
    app = FastAPI(title="simplegpt", description="An OpenAI-compatible API over a simplegpt model.")
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    add_error_handlers(app)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(f"the model '{name}' does not exist; this server serves '{model_name}'", status=404,
                           param="model", code="model_not_found")

    def check_rows(rows: list[Prompt]) -> list[Prompt]:
        if len(rows) > max_rows:
            raise APIError(f"{len(rows)} sequences (prompts x n) in one request; the server takes at most "
                           f"{max_rows}", param="n")
        return rows

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(engine, model_name, created)]}

    @app.get("/v1/models/{name}")
    def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card(engine, model_name, created)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        refuse_unsupported(req, {"best_of": req.best_of not in (None, 1), "suffix": bool(req.suffix)})
        k = logprobs_count(req.logprobs, 5, req.stream, "logprobs")
        max_new = req.max_tokens if req.max_tokens is not None else 16
        score_only = req.echo and max_new == 0  # the prompt scored (with logprobs), nothing generated
        if score_only and req.stream:
            raise APIError("max_tokens 0 with echo (scoring the prompt) is not streamed", param="max_tokens")
        params = sampling_params(req, 1 if score_only else max_new, [], max_tokens, k)
        prompts = prompt_list(req.prompt)
        rows = check_rows([p for p in prompts for _ in range(req.n)])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def choice(i: int, text: str, finish: str | None, result: Result | None = None,
                   scored: tuple[list[int], list[TokenLogprobs]] | None = None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": completion_logprobs(tokenizer, result, scored),
                    "finish_reason": finish}

        stream = scheduler.open(rows, params)
        # echo: the prompt as text (token-id prompts decoded, once the engine has checked them)
        echo = [(p if isinstance(p, str) else tokenizer.decode(p)) if req.echo else "" for p in rows]
        if not req.stream:
            # echo with logprobs: the prompt's own tokens come first, each given the ones before it
            scored = await run_in_threadpool(scheduler.score, rows, k or 0) if score_only or (req.echo and k) else None
            if score_only:
                results = [Result("", [], FINISH_LENGTH, prompt_tokens=len(ids)) for ids, _ in scored]
            else:
                results = await run_in_threadpool(scheduler.generate, stream)
            choices = [choice(i, echo[i] + r.text, r.finish_reason, r, scored[i] if scored and k is not None else None)
                       for i, r in enumerate(results)]
            return {**head, "choices": choices, "usage": usage(results, req.n)}

        async def events() -> AsyncIterator[str]:
            if req.echo:
                for i in range(len(rows)):
                    yield sse({**head, "choices": [choice(i, echo[i], None)]})
            async for event in scheduler.events(stream):
                if isinstance(event, list):
                    for i, r in enumerate(event):
                        yield sse({**head, "choices": [choice(i, "", r.finish_reason)]})
                    if req.wants_usage:
                        yield sse({**head, "choices": [], "usage": usage(event, req.n)})
                else:
                    yield sse({**head, "choices": [choice(event[0], event[1], None)]})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        check_model(req.model)
        refuse_unsupported(req, {"tools": bool(req.tools), "tool_choice": req.tool_choice not in (None, "none"),
                                 "response_format": (req.response_format or {}).get("type", "text") != "text"})
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        k = logprobs_count(req.top_logprobs or 0, 20, req.stream, "top_logprobs") if req.logprobs else None
        params = sampling_params(req, limit if limit is not None else min(DEFAULT_CHAT_MAX_TOKENS, max_tokens),
                                 [CHAT_STOP], max_tokens, k)
        rows = check_rows([chat_prompt(req.messages)] * req.n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        stream = scheduler.open(rows, params)
        if not req.stream:
            results = await run_in_threadpool(scheduler.generate, stream)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text.lstrip()},
                        "logprobs": chat_logprobs(tokenizer, r), "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage(results, req.n)}

        chunk = {**head, "object": "chat.completion.chunk"}

        def delta(i: int, d: dict[str, str], finish: str | None = None) -> str:
            return sse({**chunk, "choices": [{"index": i, "delta": d, "logprobs": None, "finish_reason": finish}]})

        async def events() -> AsyncIterator[str]:
            for i in range(len(rows)):
                yield delta(i, {"role": "assistant", "content": ""})
            started = [False] * len(rows)
            async for event in scheduler.events(stream):
                if isinstance(event, list):
                    for i, r in enumerate(event):
                        yield delta(i, {}, r.finish_reason)
                    if req.wants_usage:
                        yield sse({**chunk, "choices": [], "usage": usage(event, req.n)})
                else:
                    i, piece = event
                    if not started[i]:  # the reply without the space after 'Assistant:', as non-streamed
                        piece = piece.lstrip()
                        started[i] = bool(piece)
                    if piece:
                        yield delta(i, {"content": piece})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
