"""From generated tokens to text: UTF-8-safe pieces with stop strings, each row's state, the
Result of a sequence, and the streams that hand pieces out as they are decoded."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .sampling import TokenLogprobs

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class Result:
    """One generated sequence. text excludes the prompt, EOS and any stop string."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)
    stop_reason: str | int | None = None  # the stop string matched, or the EOS id; None for "length"
    prompt_tokens: int = 0  # after left truncation to the window
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry, with SamplingParams(logprobs=k)


class TextAssembler:
    """Turns a row's token bytes into safe text pieces.

    Pieces never end inside a multi-byte character (an incremental UTF-8 decoder holds the
    partial bytes) and never contain the start of a possible stop string (held back until it
    is known not to be one), so their concatenation is exactly the final text.
    """

    def __init__(self, stops: Sequence[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.matched: str | None = None

    def feed(self, data: bytes, final: bool = False) -> str:
        """Add bytes; return the newly safe text. Sets `matched` when a stop string appears."""
        before = len(self.text)
        self.text += self.decoder.decode(data, final=final)
        hold = 0
        if self.stops:
            longest = max(len(s) for s in self.stops)
            window_start = max(0, before - longest + 1)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, window_start)) >= 0]
            if hits:
                cut, self.matched = min(hits)
                self.text = self.text[:cut]
                final = True
            elif not final:
                hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        upto = len(self.text) - hold
        piece = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return piece


@dataclass
class Row:
    """One sequence of a generate/stream call while it is decoded."""

    prompt_len: int
    tokens: list[int]  # prompt (after truncation) + generated; the context is tokens[start:]
    generator: torch.Generator
    text: TextAssembler | None
    start: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None  # with SamplingParams(logprobs=k): one per generated token

    def accept(self, token: int, logprob: TokenLogprobs | None, eos_id: int | None, max_new_tokens: int,
               decode_bytes: Callable[[list[int]], bytes] | None) -> list[str]:
        """Takes the token drawn for this row: eos_id (None: EOS does not stop) finishes it, any other
        token is appended (with its logprob when logprobs are on) and may complete a stop string or
        max_new_tokens. Returns the text pieces it releases, in order (the new text, and the rest
        held back for a stop string once the row is finished); decode_bytes: the tokenizer's, for
        rows with text."""
        pieces = []
        if eos_id is not None and token == eos_id:
            self.finish_reason, self.stop_reason = FINISH_STOP, token
        else:
            self.generated.append(token)
            self.tokens.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            if self.text is not None:
                pieces.append(self.text.feed(decode_bytes([token])))
                if self.text.matched is not None:
                    self.finish_reason, self.stop_reason = FINISH_STOP, self.text.matched
            if self.finish_reason is None and len(self.generated) >= max_new_tokens:
                self.finish_reason = FINISH_LENGTH
        if self.finish_reason is not None and self.text is not None and self.text.matched is None:
            pieces.append(self.text.feed(b"", final=True))
        return [piece for piece in pieces if piece]

    def result(self) -> Result:
        text = self.text.text if self.text is not None else ""
        return Result(text, list(self.generated), self.finish_reason or FINISH_LENGTH, self.stop_reason,
                      self.prompt_len, None if self.logprobs is None else list(self.logprobs))


class Stream:
    """An iterator of (row, text piece) events; `results` holds one Result per row once exhausted."""

    def __init__(self, events: Iterator[tuple[int, str]], rows: list[Row]):
        self._events, self._rows = events, rows
        self.results: list[Result] | None = None

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> tuple[int, str]:
        try:
            return next(self._events)
        except StopIteration:
            self.results = [r.result() for r in self._rows]
            raise

    def close(self) -> None:
        """Stop generating (a reader that leaves early); the call's cache is released."""
        self._events.close()


class TextStream:
    """The text pieces of one prompt; `result` is set once the iteration has finished."""

    def __init__(self, stream: Stream):
        self._stream = stream
        self.result: Result | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._stream)[1]
        except StopIteration:
            self.result = self._stream.results[0]
            raise
