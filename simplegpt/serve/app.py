"""The FastAPI app: its routes, each a thin step from a request body to the engine and back."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response, StreamingResponse

from ..engine import FINISH_LENGTH, Engine, Result, TokenLogprobs
from ..tokenizer import EOS_TEXT
from .chat import DEFAULT_CHAT_MAX_TOKENS, chat_input
from .errors import APIError, add_error_handlers, error_body
from .guard import Guard
from .metrics import Metrics
from .params import Prompt, encode, logprobs_count, prompt_list, prompt_tokens, refuse_unsupported, sampling_params
from .responses import (ChatTokens, Offsets, chat_logprobs, choice_logprobs, completion_logprobs, model_card,
                        reply_logprobs, sse, usage)
from .scheduler import RequestTimeout, Scheduler, ServerStopping, Submission
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

STATIC = Path(__file__).parent.parent / "static"
CLIENT_GONE = 499  # the status logged for a request whose client left before its answer (nginx's)


@dataclass
class Limits:
    """What the server takes, each with its default (see `simplegpt serve --help`).

    max_tokens: new tokens per sequence; max_rows: sequences (prompts x n) per request; max_batch:
    sequences decoded together; max_queue: sequences that may wait for a place (then 429);
    timeout: seconds a request may run (then it is cancelled: 504, or an error event when
    streamed); max_body: bytes of a request body (413); body_timeout: seconds to send it (408)."""

    max_tokens: int = 4096
    max_rows: int = 64
    max_batch: int = 16
    max_queue: int = 256
    timeout: float | None = 600.0
    max_body: int = 2 * 2**20
    body_timeout: float = 30.0


def create_app(engine: Engine, model_name: str, max_tokens: int = 4096, max_rows: int = 64,
               cors_origins: Sequence[str] = (), *, limits: Limits | None = None, api_keys: Sequence[str] = (),
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name` (see simplegpt.serve). Requests run
    together in one continuously batched decode (serve.scheduler). max_tokens and max_rows: as in
    Limits (limits, when given, holds every limit and wins). cors_origins: web origins (e.g.
    http://localhost:3000, or "*") whose pages may call the API from a browser; none by default.
    api_keys: keys a request to /v1 or /metrics must send as a bearer token (none: open).
    allowed_hosts: the names the Host header may give (None: any).
    Raises ValueError for an engine without a tokenizer."""
    if engine.tokenizer is None:
        raise ValueError("serving needs a model with a tokenizer (text in, text out)")
    limits = limits or Limits(max_tokens=max_tokens, max_rows=max_rows)
    tokenizer, window = engine.tokenizer, engine.window
    scheduler = Scheduler(engine, limits.max_batch, limits.max_queue, limits.timeout)
    metrics = Metrics(lambda: scheduler.queued, lambda: scheduler.running, limits.max_batch)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        scheduler.close(timeout=10)

    # No /docs or /redoc pages: they load their scripts from a CDN; /openapi.json needs the key (guard.PROTECTED).
    app = FastAPI(title="simplegpt", description="An OpenAI-compatible API over a simplegpt model.",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(Guard, api_keys=api_keys, allowed_hosts=allowed_hosts, max_body=limits.max_body,
                       body_timeout=limits.body_timeout, on_done=metrics.request_done)
    if cors_origins:  # outside the guard: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    add_error_handlers(app)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(f"the model '{name}' does not exist; this server serves '{model_name}'", status=404,
                           param="model", code="model_not_found")

    def check_rows(rows: list[Prompt]) -> list[Prompt]:
        if len(rows) > limits.max_rows:
            raise APIError(f"{len(rows)} sequences (prompts x n) in one request; the server takes at most "
                           f"{limits.max_rows}", param="n")
        return rows

    def token_rows(rows: list[Prompt], truncate: int | None, param: str = "prompt") -> list[list[int]]:
        return [prompt_tokens(tokenizer, p, window, truncate, param) for p in rows]

    def count(results: list[Result], n: int) -> None:
        u = usage(results, n)
        metrics.prompt_tokens.inc(u["prompt_tokens"])
        metrics.generated_tokens.inc(u["completion_tokens"])

    def timed_out() -> APIError:
        return APIError(f"the request ran past the server's --request-timeout of {limits.timeout:g} s and was "
                        "cancelled", status=504, code="timeout")

    def stopped(e: ServerStopping) -> APIError:
        return APIError(str(e), status=503, code="server_shutdown")

    async def finished(sub: Submission, request: Request) -> list[Result] | Response:
        """A request that is not streamed: its results, or an empty answer when its client left."""
        try:
            results = await sub.results(request.is_disconnected)
        except RequestTimeout:
            raise timed_out() from None
        except ServerStopping as e:
            raise stopped(e) from None
        return Response(status_code=CLIENT_GONE) if results is None else results

    async def score_prompts(ids: list[list[int]], top: int, request: Request,
                            deadline: float | None) -> list[tuple[list[int], list[TokenLogprobs]]] | None:
        """The prompts scored (Scheduler.score: the queue's limit, the deadline, None when the client left)."""
        try:
            return await scheduler.score(ids, top, request.is_disconnected, deadline)
        except RequestTimeout:
            raise timed_out() from None
        except ServerStopping as e:
            raise stopped(e) from None

    def first_token_timer(sub: Submission) -> None:
        start = time.perf_counter()
        sub.on_first = lambda: metrics.ttft.observe(time.perf_counter() - start)

    def streamed(sub: Submission, n: int, wants_usage: bool, head: dict[str, Any], opening: Iterable[str],
                 piece_event: Callable[[int, str, int], str | None],
                 final_event: Callable[[int, Result], str]) -> StreamingResponse:
        """A streamed request's server-sent events, for completions and chat alike: `opening` first, then
        piece_event(row, text piece, tokens so far) for each piece (None: nothing to send), at the end
        final_event(row, Result) for each row, the usage chunk (stream_options.include_usage) and
        [DONE]; a request past its time, or whose decoding failed, ends with an error event instead (its
        status was sent)."""

        async def events() -> AsyncIterator[str]:
            for event in opening:
                yield event
            try:
                async for event in sub.events():
                    if isinstance(event, list):
                        count(event, n)
                        for i, r in enumerate(event):
                            yield final_event(i, r)
                        if wants_usage:
                            yield sse({**head, "choices": [], "usage": usage(event, n)})
                    else:
                        out = piece_event(*event)
                        if out is not None:
                            yield out
            except (RequestTimeout, ServerStopping, APIError) as caught:  # past its time, stopped, or failed (500)
                e = (timed_out() if isinstance(caught, RequestTimeout)
                     else stopped(caught) if isinstance(caught, ServerStopping) else caught)
                yield sse(error_body(e.message, e.status, code=e.code))
                return
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/load", include_in_schema=False)
    def load() -> dict[str, int]:
        """The playground's view of the server's load."""
        return {"running": scheduler.running, "queued": scheduler.queued, "max_batch": limits.max_batch}

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(engine, model_name, created)]}

    @app.get("/v1/models/{name:path}")  # ids such as org/tiny-gpt hold a slash
    def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card(engine, model_name, created)

    # vLLM's tokenizer routes, through which lm-evaluation-harness's API clients (local-completions)
    # tokenize a task's text as the server does: any simplegpt tokenizer works, with nothing to download.
    @app.get("/tokenizer_info")
    def tokenizer_info() -> dict[str, Any]:
        return {"tokenizer_class": f"simplegpt-{tokenizer.kind}", "eos_token": EOS_TEXT, "bos_token": None,
                "pad_token": None, "model_max_length": window, "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            check_model(req.model)
        # the end-of-text token's name is that token here, as in Hugging Face's tokenizers (and vLLM's
        # /tokenize); a completion's text prompt stays plain text
        ids: list[int] = []
        for i, part in enumerate(req.prompt.split(EOS_TEXT)):
            ids += ([tokenizer.eos_id] if i else []) + (encode(tokenizer, part) if part else [])
        return {"tokens": ids, "count": len(ids), "max_model_len": window}

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        if req.model is not None:
            check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", param="tokens")
        # the end-of-text token reads as its name, as /tokenize takes it (every tokenizer alike: the char and
        # byte tokenizers' decode drops it)
        parts: list[list[int]] = [[]]
        for t in req.tokens:
            if t == tokenizer.eos_id:
                parts.append([])
            else:
                parts[-1].append(t)
        return {"prompt": EOS_TEXT.join(tokenizer.decode(part) for part in parts)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        refuse_unsupported(req, {"best_of": req.best_of not in (None, 1), "suffix": bool(req.suffix)})
        k = logprobs_count(req.logprobs, 5, "logprobs")
        max_new = req.max_tokens if req.max_tokens is not None else 16
        score_only = req.echo and max_new == 0  # the prompt scored (with logprobs), nothing generated
        if score_only and req.stream:
            raise APIError("max_tokens 0 with echo (scoring the prompt) is not streamed", param="max_tokens")
        params = sampling_params(req, 1 if score_only else max_new, [], limits.max_tokens, k)
        prompts = prompt_list(req.prompt)
        rows = check_rows([p for p in prompts for _ in range(req.n)])
        ids = token_rows(rows, req.truncate_prompt_tokens)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def choice(i: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        # echo: the prompt as text (token-id prompts and cut prompts as their tokens decode)
        def echoed(i: int) -> str:
            p = rows[i]
            whole = isinstance(p, str) and req.truncate_prompt_tokens is None
            return (p if whole else tokenizer.decode(ids[i])) if req.echo else ""

        deadline = scheduler.deadline()  # scoring the prompt and generating share the request's time
        if score_only:
            scored = await score_prompts(ids, k or 0, request, deadline)
            if scored is None:
                return Response(status_code=CLIENT_GONE)
            results = [Result("", [], FINISH_LENGTH, prompt_tokens=len(t)) for t, _ in scored]
            count(results, req.n)
            choices = [choice(i, echoed(i), FINISH_LENGTH,
                              choice_logprobs(tokenizer, echoed(i), None, scored[i] if k is not None else None))
                       for i in range(len(rows))]
            return {**head, "choices": choices, "usage": usage(results, req.n)}
        # echo with logprobs: the prompt's own tokens come first, each given the ones before it
        scored = None
        if req.echo and k is not None:
            scored = await score_prompts(ids, k, request, deadline)
            if scored is None:
                return Response(status_code=CLIENT_GONE)
        sub = scheduler.submit(ids, params, req.stream, deadline)
        first_token_timer(sub)
        if not req.stream:
            results = await finished(sub, request)
            if isinstance(results, Response):
                return results
            count(results, req.n)
            choices = [choice(i, echoed(i) + r.text, r.finish_reason,
                              choice_logprobs(tokenizer, echoed(i), r, scored[i] if scored else None))
                       for i, r in enumerate(results)]
            return {**head, "choices": choices, "usage": usage(results, req.n)}

        sent = [0] * len(rows)  # each row's tokens whose logprobs went out
        shown = [len(echoed(i)) for i in range(len(rows))]  # each row's characters sent
        offsets = [Offsets(tokenizer, shown[i]) for i in range(len(rows))]

        def new_logprobs(i: int, upto: int, piece: str, last: Result | None = None) -> dict[str, Any] | None:
            """The logprobs of row i's tokens sent[i]..upto, which this piece of text completes; the
            last ones (the row's Result given) point no further than the text's end, and end with the
            end-of-text token's when it ended the row."""
            shown[i] += len(piece)
            if k is None:
                return None
            lps = sub.ticket.rows[i].logprobs[sent[i]:upto]
            sent[i] = upto
            if last is not None and last.eos_logprob is not None:
                lps = [*lps, last.eos_logprob]
            return completion_logprobs(tokenizer, lps, offsets[i]([t.token_id for t in lps],
                                                                  shown[i] if last is not None else None))

        def echo_events() -> Iterator[str]:
            for i in range(len(rows) if req.echo else 0):
                lp = choice_logprobs(tokenizer, echoed(i), None, scored[i]) if scored else None
                yield sse({**head, "choices": [choice(i, echoed(i), None, lp)]})

        return streamed(
            sub, req.n, req.wants_usage, head, echo_events(),
            lambda i, piece, upto: sse({**head, "choices": [choice(i, piece, None, new_logprobs(i, upto, piece))]}),
            lambda i, r: sse({**head, "choices": [choice(i, "", r.finish_reason,
                                                         new_logprobs(i, len(r.token_ids), "", r))]}))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        refuse_unsupported(req, {"tools": bool(req.tools), "tool_choice": req.tool_choice not in (None, "none"),
                                 "response_format": (req.response_format or {}).get("type", "text") != "text"})
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        k = logprobs_count(req.top_logprobs or 0, 20, "top_logprobs") if req.logprobs else None
        prompt, stop = chat_input(tokenizer, req.messages)  # the checkpoint's chat template, or the plain one
        params = sampling_params(req, limit if limit is not None else min(DEFAULT_CHAT_MAX_TOKENS, limits.max_tokens),
                                 stop, limits.max_tokens, k)
        rows = check_rows([prompt] * req.n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        sub = scheduler.submit(token_rows(rows, req.truncate_prompt_tokens, "messages"), params, req.stream)
        first_token_timer(sub)
        if not req.stream:
            results = await finished(sub, request)
            if isinstance(results, Response):
                return results
            count(results, req.n)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text.lstrip()},
                        "logprobs": chat_logprobs(tokenizer, reply_logprobs(tokenizer, r)),
                        "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage(results, req.n)}

        chunk = {**head, "object": "chat.completion.chunk"}

        reporting = [ChatTokens(tokenizer) for _ in rows]  # which tokens' logprobs go out, as non-streamed

        def delta(i: int, d: dict[str, str], finish: str | None = None, piece: str | None = None,
                  upto: int = 0) -> str:
            lp = None
            if k is not None and piece is not None:  # the row's first `upto` tokens released `piece`
                row = sub.ticket.rows[i]
                lp = chat_logprobs(tokenizer, [row.logprobs[t] for t in
                                               reporting[i].release(row.generated[:upto], piece, finish is not None)])
            return sse({**chunk, "choices": [{"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}]})

        started = [False] * len(rows)

        def piece_event(i: int, piece: str, upto: int) -> str | None:
            shown = piece
            if not started[i]:  # the reply without the space after 'Assistant:', as non-streamed
                shown = piece.lstrip()
                started[i] = bool(shown)
            if not shown:
                if k is not None:  # its tokens are decided with the next piece
                    reporting[i].release(sub.ticket.rows[i].generated[:upto], piece)
                return None
            return delta(i, {"content": shown}, piece=piece, upto=upto)

        return streamed(sub, req.n, req.wants_usage, chunk,
                        (delta(i, {"role": "assistant", "content": ""}) for i in range(len(rows))), piece_event,
                        lambda i, r: delta(i, {}, r.finish_reason, "", len(r.token_ids)))

    return app
