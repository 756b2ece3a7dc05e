"""An OpenAI-compatible HTTP API over the generation engine, and a web playground (`simplegpt serve`).

Endpoints (the shapes of OpenAI's API, so its official clients work against it):

- GET  /v1/models            the one model served
- POST /v1/completions       text completion: prompt (a string or a list of them), n, stream (SSE)
- POST /v1/chat/completions  chat over the base model through a plain-text template (chat_prompt)
- GET  /health               {"status": "ok"}
- GET  /                     the playground: a page that streams completions from /v1/completions

Sampling: temperature, top_p, seed, stop, max_tokens (max_completion_tokens for chat), n, and
simplegpt's own top_k, min_p, repetition_penalty and ignore_eos (the `extra_body` of OpenAI's
clients); logprobs (and chat's top_logprobs) in responses that are not streamed, with echo also
for the prompt's tokens (max_tokens 0 scores a prompt without generating). Options simplegpt has
no equivalent for (presence/frequency penalties, logit_bias, best_of, suffix, tools) are refused
with a 400, not silently dropped. Errors come as
OpenAI's {"error": {"message", "type", "param", "code"}} with 400 (bad request) or 404 (unknown model).

Requests are served one generation at a time: the engine already runs on every core, and a
second generation beside it would only share them. Several prompts (or n > 1) in one request
run as one batch.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .engine import FINISH_LENGTH, Engine, Result, SamplingParams, Stream, TokenLogprobs

STATIC = Path(__file__).parent / "static"
CHAT_STOP = "\nUser:"
DEFAULT_CHAT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


class _Sampling(BaseModel):
    """The sampling fields completions and chat share. A field sent as null takes its default, as
    some clients send every option they know of."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def wants_usage(self) -> bool:
        """A streamed response ends with a usage chunk (stream_options.include_usage)."""
        return bool((self.stream_options or {}).get("include_usage"))

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # simplegpt's own (OpenAI clients send them with extra_body)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    # OpenAI's, which simplegpt has no equivalent for: refused unless left at their defaults
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None  # the chosen token's log-probability and this many alternatives (0-5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The plain-text prompt a base model continues: system text, then 'User: ...' / 'Assistant: ...'
    lines, then 'Assistant:' (generation stops at the next 'User:' line)."""
    parts: list[str] = []
    for m in messages:
        if isinstance(m.content, list):
            if any(p.get("type") != "text" for p in m.content):
                raise APIError("only text content parts are supported", param="messages")
            text = "".join(p.get("text", "") for p in m.content)
        else:
            text = m.content or ""
        if m.role in ("system", "developer"):
            parts.append(f"{text}\n\n")
        else:
            parts.append(f"{'User' if m.role == 'user' else 'Assistant'}: {text}\n")
    return "".join(parts) + "Assistant:"


def _refuse_unsupported(req: _Sampling, extra: dict[str, Any]) -> None:
    unsupported = {"presence_penalty": req.presence_penalty != 0, "frequency_penalty": req.frequency_penalty != 0,
                   "logit_bias": bool(req.logit_bias), **extra}
    for name, used in unsupported.items():
        if used:
            hint = " (simplegpt's repetition_penalty is the nearest option)" if name.endswith("_penalty") else ""
            raise APIError(f"{name} is not supported by simplegpt{hint}", param=name)


def _logprobs(k: int | None, most: int, stream: bool, param: str) -> int | None:
    """The number of alternatives to report (None = no logprobs), checked."""
    if k is None:
        return None
    if not 0 <= k <= most:
        raise APIError(f"{param} must be between 0 and {most}, got {k}", param=param)
    if stream:
        raise APIError("logprobs are reported in responses that are not streamed; drop stream or logprobs",
                       param="logprobs")
    return k


def _token_text(server: "Server", token_id: int) -> tuple[str, list[int]]:
    """A token as text (bytes that are not whole UTF-8 characters as \\x escapes) and as bytes."""
    raw = server.engine.tokenizer.decode_bytes([token_id])
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def _params(req: _Sampling, max_tokens: int, stop: list[str], limit: int,
            logprobs: int | None = None) -> SamplingParams:
    if not 0 <= req.temperature <= 2:
        raise APIError(f"temperature must be between 0 and 2, got {req.temperature}", param="temperature")
    if not 1 <= req.n <= 16:
        raise APIError(f"n must be between 1 and 16, got {req.n}", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise APIError("stop takes at most 4 strings", param="stop")
    if not 0 < max_tokens <= limit:
        raise APIError(f"max_tokens must be between 1 and {limit} (the server's --max-tokens), got {max_tokens}",
                       param="max_tokens")
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                              seed=req.seed, stop=[s for s in stops + stop if s], stop_at_eos=not req.ignore_eos,
                              logprobs=logprobs)
    except ValueError as e:
        raise APIError(str(e)) from None


class Server:
    """The state behind the app: the engine, the model's name and the lock that serializes generations."""

    def __init__(self, engine: Engine, model_name: str, max_tokens: int, max_rows: int):
        if engine.tokenizer is None:
            raise ValueError("serving needs a model with a tokenizer (text in, text out)")
        self.engine, self.model_name, self.max_tokens, self.max_rows = engine, model_name, max_tokens, max_rows
        self.lock = threading.Lock()
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(f"the model '{name}' does not exist; this server serves '{self.model_name}'", status=404,
                           param="model", code="model_not_found")

    def prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)

    def rows(self, rows: list[str | list[int]]) -> list[str | list[int]]:
        if len(rows) > self.max_rows:
            raise APIError(f"{len(rows)} sequences (prompts x n) in one request; the server takes at most "
                           f"{self.max_rows}", param="n")
        return rows

    def open(self, prompts: list[str | list[int]], params: SamplingParams) -> Stream:
        """The engine's stream for a batch of prompts, before anything is generated: prompts it
        cannot take (token ids out of range, ...) are a 400 here, before the response starts."""
        try:
            return self.engine.stream_batch(prompts, params)
        except (ValueError, TypeError) as e:
            raise APIError(str(e), param="prompt") from None

    def score(self, prompts: list[str | list[int]], top: int) -> list[tuple[list[int], list[TokenLogprobs]]]:
        with self.lock:
            return self.engine.score(prompts, top)

    def generate(self, stream: Stream) -> list[Result]:
        with self.lock:
            for _ in stream:
                pass
        return stream.results

    async def events(self, stream: Stream) -> AsyncIterator[tuple[int, str] | list[Result]]:
        """The stream's (row, piece) events, then its list of results. The generation runs on a
        worker thread that holds the lock and hands each event to the event loop, so it goes on
        while the loop sends the previous one. A client that leaves stops it at the next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        leave = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (the server is shutting down)
                leave.set()

        def produce() -> None:
            try:
                with self.lock:
                    try:
                        for event in stream:
                            if leave.is_set():
                                return
                            put(event)
                        put(stream.results)
                    finally:
                        stream.close()
            except Exception as e:  # noqa: BLE001 - handed to the request, which raises it
                put(e)
            finally:
                put(_DONE)

        loop.run_in_executor(None, produce)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            leave.set()


_DONE = object()  # the end of a stream's events


def _usage(results: list[Result], n: int) -> dict[str, int]:
    """Token counts of a request whose rows are each prompt n times: its prompts counted once each."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine: Engine, model_name: str, max_tokens: int = 4096, max_rows: int = 64,
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (see the module's docstring). A request
    may ask for at most max_tokens new tokens per sequence and max_rows sequences (prompts x n): a
    generation holds the server while it runs. cors_origins: web origins (e.g. http://localhost:3000,
    or "*") whose pages may call the API from a browser; none by default."""
    server = Server(engine, model_name, max_tokens, max_rows)
    app = FastAPI(title="simplegpt", description="An OpenAI-compatible API over a simplegpt model.")
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        kind = "not_found_error" if e.status == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                            status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": where or None,
                                       "code": None}}, status_code=400)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name}")
    def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return _model_card(server)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        server.check_model(req.model)
        _refuse_unsupported(req, {"best_of": req.best_of not in (None, 1), "suffix": bool(req.suffix)})
        k = _logprobs(req.logprobs, 5, req.stream, "logprobs")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        score_only = req.echo and max_tokens == 0  # the prompt scored (with logprobs), nothing generated
        if score_only and req.stream:
            raise APIError("max_tokens 0 with echo (scoring the prompt) is not streamed", param="max_tokens")
        params = _params(req, 1 if score_only else max_tokens, [], server.max_tokens, k)
        prompts = server.prompts(req.prompt)
        rows = server.rows([p for p in prompts for _ in range(req.n)])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}

        def choice(i: int, text: str, finish: str | None, result: Result | None = None,
                   scored: tuple[list[int], list[TokenLogprobs]] | None = None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": _completion_logprobs(server, result, scored),
                    "finish_reason": finish}

        stream = server.open(rows, params)
        # echo: the prompt as text (token-id prompts decoded, once the engine has checked them)
        echo = [(p if isinstance(p, str) else engine.tokenizer.decode(p)) if req.echo else "" for p in rows]
        if not req.stream:
            # echo with logprobs: the prompt's own tokens come first, each given the ones before it
            scored = await run_in_threadpool(server.score, rows, k or 0) if score_only or (req.echo and k) else None
            if score_only:
                results = [Result("", [], FINISH_LENGTH, prompt_tokens=len(ids)) for ids, _ in scored]
            else:
                results = await run_in_threadpool(server.generate, stream)
            choices = [choice(i, echo[i] + r.text, r.finish_reason, r, scored[i] if scored and k is not None else None)
                       for i, r in enumerate(results)]
            return {**head, "choices": choices, "usage": _usage(results, req.n)}

        async def events() -> AsyncIterator[str]:
            if req.echo:
                for i in range(len(rows)):
                    yield _sse({**head, "choices": [choice(i, echo[i], None)]})
            async for event in server.events(stream):
                if isinstance(event, list):
                    for i, r in enumerate(event):
                        yield _sse({**head, "choices": [choice(i, "", r.finish_reason)]})
                    if req.wants_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(event, req.n)})
                else:
                    yield _sse({**head, "choices": [choice(event[0], event[1], None)]})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        server.check_model(req.model)
        _refuse_unsupported(req, {"tools": bool(req.tools), "tool_choice": req.tool_choice not in (None, "none"),
                                  "response_format": (req.response_format or {}).get("type", "text") != "text"})
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        k = _logprobs(req.top_logprobs or 0, 20, req.stream, "top_logprobs") if req.logprobs else None
        params = _params(req, limit if limit is not None else min(DEFAULT_CHAT_MAX_TOKENS, server.max_tokens),
                         [CHAT_STOP], server.max_tokens, k)
        rows = server.rows([chat_prompt(req.messages)] * req.n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}

        stream = server.open(rows, params)
        if not req.stream:
            results = await run_in_threadpool(server.generate, stream)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text.lstrip()},
                        "logprobs": _chat_logprobs(server, r), "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]
            return {**head, "object": "chat.completion", "choices": choices,
                    "usage": _usage(results, req.n)}

        chunk = {**head, "object": "chat.completion.chunk"}

        def delta(i: int, d: dict[str, str], finish: str | None = None) -> str:
            return _sse({**chunk, "choices": [{"index": i, "delta": d, "logprobs": None, "finish_reason": finish}]})

        async def events() -> AsyncIterator[str]:
            for i in range(len(rows)):
                yield delta(i, {"role": "assistant", "content": ""})
            started = [False] * len(rows)
            async for event in server.events(stream):
                if isinstance(event, list):
                    for i, r in enumerate(event):
                        yield delta(i, {}, r.finish_reason)
                    if req.wants_usage:
                        yield _sse({**chunk, "choices": [], "usage": _usage(event, req.n)})
                else:
                    i, piece = event
                    if not started[i]:  # the reply without the space after 'Assistant:', as non-streamed
                        piece = piece.lstrip()
                        started[i] = bool(piece)
                    if piece:
                        yield delta(i, {"content": piece})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _completion_logprobs(server: Server, result: Result | None,
                         scored: tuple[list[int], list[TokenLogprobs]] | None) -> dict[str, Any] | None:
    """The completions API's logprobs: tokens, their log-probabilities, the alternatives, text
    offsets; with `scored` (echo) the prompt's tokens first, the very first without any (null)."""
    if scored is None and (result is None or result.logprobs is None):
        return None
    entries: list[TokenLogprobs | int] = []
    if scored is not None:
        ids, lps = scored
        entries = [ids[0], *lps]
    if result is not None and result.logprobs:
        entries += result.logprobs
    tokens = [_token_text(server, e if isinstance(e, int) else e.token_id)[0] for e in entries]
    return {"tokens": tokens,
            "token_logprobs": [None if isinstance(e, int) else e.logprob for e in entries],
            "top_logprobs": [None if isinstance(e, int) else {_token_text(server, i)[0]: v for i, v in e.top}
                             for e in entries],
            "text_offset": [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]}


def _chat_logprobs(server: Server, result: Result) -> dict[str, Any] | None:
    """The chat API's logprobs: one entry per token with its bytes and the alternatives."""
    if result.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = _token_text(server, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                        for t in result.logprobs]}


def _model_card(server: Server) -> dict[str, Any]:
    cfg = server.engine.config
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "simplegpt",
            "context_length": cfg.n_positions, "parameters": server.engine.model.num_parameters()}
