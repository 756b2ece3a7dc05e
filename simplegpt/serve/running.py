"""A submitted request's outcome as an answer: its results awaited whole, its prompts scored, or its
pieces streamed as server-sent events; the scheduler's timeout and shutdown become APIErrors (504,
503), and a client that left gets an empty answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..generation.sampling import TokenLogprobs
from ..generation.text import Result
from .errors import APIError, error_body
from .responses import sse, usage
from .scheduler import RequestTimeout, ServerStopping, Submission
from .state import ServerState

CLIENT_GONE = 499  # the status logged for a request whose client left before its answer (nginx's)


def timed_out(state: ServerState) -> APIError:
    return APIError(f"the request ran past the server's --request-timeout of {state.limits.timeout:g} s and was "
                    "cancelled", status=504, code="timeout")


def stopped(e: ServerStopping) -> APIError:
    return APIError(str(e), status=503, code="server_shutdown")


def timing_first_token(state: ServerState, sub: Submission) -> Submission:
    """sub, whose first piece records the time to first token from now."""
    start = time.perf_counter()
    sub.on_first = lambda: state.metrics.ttft.observe(time.perf_counter() - start)
    return sub


async def finished(state: ServerState, sub: Submission, request: Request) -> list[Result] | Response:
    """A request that is not streamed: its results, or an empty answer when its client left."""
    return await answer(state, sub.results(request.is_disconnected))


async def scored(state: ServerState, ids: list[list[int]], top: int, request: Request,
                 deadline: float | None) -> list[tuple[list[int], list[TokenLogprobs]]] | Response:
    """The prompts scored (Scheduler.score: the queue's limit, the deadline), or an empty answer when
    the client left."""
    return await answer(state, state.scheduler.score(ids, top, request.is_disconnected, deadline))


async def answer(state: ServerState, outcome: Awaitable[Any]) -> Any:
    """What outcome gives, an empty answer for None (the client left), or the APIError for a request
    past its time (504) or stopped by the server's shutdown (503)."""
    try:
        out = await outcome
    except RequestTimeout:
        raise timed_out(state) from None
    except ServerStopping as e:
        raise stopped(e) from None
    return Response(status_code=CLIENT_GONE) if out is None else out


def streamed(state: ServerState, sub: Submission, n: int, wants_usage: bool, head: dict[str, Any],
             opening: Iterable[str], piece_event: Callable[[int, str, int], str | None],
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
                    state.count(event, n)
                    for i, r in enumerate(event):
                        yield final_event(i, r)
                    if wants_usage:
                        yield sse({**head, "choices": [], "usage": usage(event, n)})
                else:
                    out = piece_event(*event)
                    if out is not None:
                        yield out
        except (RequestTimeout, ServerStopping, APIError) as caught:  # past its time, stopped, or failed (500)
            e = (timed_out(state) if isinstance(caught, RequestTimeout)
                 else stopped(caught) if isinstance(caught, ServerStopping) else caught)
            yield sse(error_body(e.message, e.status, code=e.code))
            return
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
