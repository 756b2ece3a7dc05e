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
    eos_logprob: TokenLogprobs | None = None  # with logprobs: the end-of-text token's, when it ended the row


class StopMatcher:
    """Finds one stop string in text fed to it piece by piece (Knuth-Morris-Pratt).

    `state` is the length of the longest prefix of the stop that the text fed so far ends with
    (the text a stop may still start in). Each feed costs O(len(new text) + len(stop)) character
    steps, whatever the length of the text before it: the text itself is not kept.
    Source: Knuth, Morris & Pratt, "Fast pattern matching in strings", SIAM J. Comput. 6(2), 1977.
    """

    def __init__(self, stop: str):
        if not stop:
            raise ValueError("a stop string must not be empty")
        self.stop = stop
        self.state = 0
        # failure[q]: the longest proper prefix of stop[:q + 1] that is also its suffix
        failure = [0] * len(stop)
        k = 0
        for q in range(1, len(stop)):
            while k and stop[q] != stop[k]:
                k = failure[k - 1]
            if stop[q] == stop[k]:
                k += 1
            failure[q] = k
        self.failure = failure

    def feed(self, text: str) -> int:
        """Advance over text; return the index in it where the first whole stop string ends (exclusive,
        so it starts at that index minus len(stop)), or -1. After a match the matcher is spent."""
        stop, failure, q, m = self.stop, self.failure, self.state, len(self.stop)
        for i, c in enumerate(text):
            while q and stop[q] != c:
                q = failure[q - 1]
            if stop[q] == c:
                q += 1
                if q == m:
                    self.state = q
                    return i + 1
        self.state = q
        return -1


class TextAssembler:
    """Turns a row's token bytes into safe text pieces.

    Pieces never end inside a multi-byte character (an incremental UTF-8 decoder holds the
    partial bytes) and never contain the start of a possible stop string (held back until it
    is known not to be one), so their concatenation is exactly the final text. The first stop
    string to start in the text (the earliest; of two starting together, the smaller string) ends it.

    Each feed costs O(len(new text) + len(stop)) per stop string, not the length of the text so far:
    a matcher per stop (StopMatcher) keeps how much of its stop the text ends with, and only the
    held-back tail is kept apart from the emitted pieces.
    """

    def __init__(self, stops: Sequence[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = stops
        self.matchers = [StopMatcher(s) for s in stops]
        self._pieces: list[str] = []  # the emitted text, in pieces (joined when `text` is read)
        self.pending = ""  # decoded text not emitted yet: at most a stop's length - 1 between feeds
        self.emitted = 0  # characters emitted
        self.matched: str | None = None

    @property
    def text(self) -> str:
        """All the text so far (cut before a matched stop string), emitted or held back."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return (self._pieces[0] if self._pieces else "") + self.pending

    def feed(self, data: bytes, final: bool = False) -> str:
        """Add bytes; return the newly safe text. Sets `matched` when a stop string appears (the text
        ends before it, and later feeds add nothing)."""
        if self.matched is not None:
            return ""
        new = self.decoder.decode(data, final=final)
        pending = self.pending + new
        hold = 0
        if self.matchers:
            base = len(self.pending)  # `new` starts here in `pending`
            hits = [(base + end - len(m.stop), m.stop) for m in self.matchers if (end := m.feed(new)) >= 0]
            if hits:
                cut, self.matched = min(hits)
                pending = pending[:cut]
            elif not final:
                hold = max(m.state for m in self.matchers)
        upto = len(pending) - hold
        piece, self.pending = pending[:upto], pending[upto:]
        if piece:
            self._pieces.append(piece)
            self.emitted += len(piece)
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
    eos_logprob: TokenLogprobs | None = None  # the drawn end-of-text token's, which token_ids leave out

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
            self.eos_logprob = logprob
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
                      self.prompt_len, None if self.logprobs is None else list(self.logprobs), self.eos_logprob)


class Stream:
    """An iterator of (row, text piece) events; `results` holds one Result per row once exhausted."""

    def __init__(self, events: Iterator[tuple[int, str]], rows: list[Row]):
        self._events, self._rows = events, rows
        self.results: list[Result] | None = None

    @property
    def rows(self) -> list[Row]:
        """The rows decoded, one per prompt, in order: each prompt checked, cut to the window and
        given its own generator (seed + i), as they stand now."""
        return self._rows

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
