"""The server's side of continuous batching: requests go to one ContinuousBatcher
(simplegpt.generation.scheduler), which runs every request's rows in one decode batch on its own
thread, and their pieces and results come back to the event loop.

A request beyond the queue's room is refused (429) rather than queued without bound; a request
whose client leaves, or that runs past the server's timeout, is cancelled and its rows leave the
batch at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..engine import Engine, Result, SamplingParams, TokenLogprobs
from ..generation.scheduler import ContinuousBatcher, Ticket
from .errors import APIError
from .params import Prompt

_DONE = object()  # the end of a request's events


class RequestTimeout(Exception):
    """A request ran past the server's --request-timeout and was cancelled."""


class Submission:
    """One request in the batcher: its events as they come, then its results."""

    def __init__(self, queue: asyncio.Queue, timeout: float | None):
        self.queue, self.timeout = queue, timeout
        self.ticket: Ticket | None = None
        self.on_first: Callable[[], None] | None = None  # called when the first piece arrives

    def cancel(self) -> None:
        if self.ticket is not None:
            self.ticket.cancel()

    async def events(self) -> AsyncIterator[tuple[int, str] | list[Result]]:
        """The (row, piece) events, then the list of results. Raises RequestTimeout past the
        timeout; the request is cancelled when the reader stops early (a client that left)."""
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        try:
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise RequestTimeout()
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    raise RequestTimeout() from None
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if self.on_first is not None and isinstance(item, tuple):
                    self.on_first()
                    self.on_first = None
                yield item
        finally:
            self.cancel()

    async def results(self, disconnected: Callable[[], Awaitable[bool]]) -> list[Result] | None:
        """The results of a request that is not streamed; None when disconnected() turned true
        first (the request is then cancelled). Raises RequestTimeout past the timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        look = loop.time() + 0.25  # when to look at the client next, whether or not pieces come
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, look - loop.time()))
                except asyncio.TimeoutError:
                    item = None
                if loop.time() >= look:
                    if await disconnected():
                        return None
                    if deadline is not None and loop.time() > deadline:
                        raise RequestTimeout()
                    look = loop.time() + 0.25
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple) and self.on_first is not None:
                    self.on_first()
                    self.on_first = None
                if isinstance(item, list):
                    return item
                if item is _DONE:
                    return None
        finally:
            self.cancel()


class Scheduler:
    """The engine's batcher and its queue's limit. max_batch: rows decoded together; max_queue:
    rows that may wait for a place (beyond them a request is a 429); timeout: seconds a request
    may run (None: no limit)."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 256, timeout: float | None = None):
        self.engine, self.max_queue, self.timeout = engine, max_queue, timeout
        self.batcher = ContinuousBatcher(engine, max_batch=max_batch)

    @property
    def queued(self) -> int:
        """Rows waiting for a place in the batch."""
        return self.batcher.queued_rows

    @property
    def running(self) -> int:
        """Rows in the batch now."""
        return self.batcher.active_rows

    def submit(self, prompts: list[Prompt], params: SamplingParams) -> Submission:
        """Queues a request (call it on the event loop). Prompts the engine cannot take (token ids
        out of range, ...) are a 400 and a full queue a 429, before the response starts."""
        if self.batcher.queued_rows + len(prompts) > self.max_queue:
            raise APIError(f"the server is busy: {self.batcher.queued_rows} sequences are waiting (its "
                           f"--max-queue is {self.max_queue}); retry shortly", status=429, code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sub = Submission(queue, self.timeout)

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (the server is shutting down)
                if sub.ticket is not None:
                    sub.ticket.cancel()

        def done(outcome: list[Result] | BaseException | None) -> None:
            if outcome is not None:
                put(outcome)
            put(_DONE)

        try:
            sub.ticket = self.batcher.submit(prompts, params, lambda row, piece: put((row, piece)), done)
        except (ValueError, TypeError) as e:
            raise APIError(str(e), param="prompt") from None
        return sub

    async def score(self, prompts: list[Prompt], top: int) -> list[tuple[list[int], list[TokenLogprobs]]]:
        """Engine.score, run on the batcher's thread between two steps."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(out: object) -> None:
            def settle() -> None:
                if future.done():
                    return
                if isinstance(out, BaseException):
                    future.set_exception(out)
                else:
                    future.set_result(out)
            loop.call_soon_threadsafe(settle)

        self.batcher.call(lambda: self.engine.score(prompts, top), done)
        try:
            return await future
        except (ValueError, TypeError) as e:
            raise APIError(str(e), param="prompt") from None

    def close(self, timeout: float | None = None) -> None:
        """Stops the batcher (what still runs is cancelled)."""
        self.batcher.stop(timeout)
