"""Runs the server's generations on the engine, one at a time, and hands streamed pieces to the
event loop.

One at a time: the engine already runs on every core, and a second generation beside it would
only share them. Several prompts (or n > 1) in one request run as one batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from ..engine import Engine, Result, SamplingParams, Stream, TokenLogprobs
from .errors import APIError
from .params import Prompt

_DONE = object()  # the end of a stream's events


class Scheduler:
    """The engine and the lock that serializes its generations."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()

    def open(self, prompts: list[Prompt], params: SamplingParams) -> Stream:
        """The engine's stream for a batch of prompts, before anything is generated: prompts it
        cannot take (token ids out of range, ...) are a 400 here, before the response starts."""
        try:
            return self.engine.stream_batch(prompts, params)
        except (ValueError, TypeError) as e:
            raise APIError(str(e), param="prompt") from None

    def score(self, prompts: list[Prompt], top: int) -> list[tuple[list[int], list[TokenLogprobs]]]:
        """Engine.score under the lock: each prompt's token ids and their log-probabilities."""
        with self.lock:
            return self.engine.score(prompts, top)

    def generate(self, stream: Stream) -> list[Result]:
        """Runs the stream to its end under the lock (blocking: call it from a worker thread)."""
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
