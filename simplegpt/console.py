"""stdout and stderr for work whose product is on disk (a training run), where losing the output
must never lose the work.

`simplegpt train ... 2>&1 | tee log`: the terminal's Ctrl-C reaches tee as well as the trainer, so
tee is gone before the trainer writes "checkpoint saved". A write to a pipe without a reader raises
BrokenPipeError (Python ignores SIGPIPE), and the same holds for a closed descriptor (`>&-`), a
terminal that went away (EIO) and a redirected log on a full disk (ENOSPC). Inside
`output_cannot_fail()`, sys.stdout and sys.stderr are streams whose writes never raise: after the
first failure the stream goes quiet, and its descriptor is pointed at os.devnull, so what is still
buffered, Python's own flush at exit and any C-level write are quiet too. The work goes on; the
process exits with the code of the work (130 after Ctrl-C), not of its output.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class QuietOnFailure:
    """A text stream that forwards to `stream` until a write or flush fails, then drops the output."""

    def __init__(self, stream: TextIO | None):
        self.stream: TextIO = stream if stream is not None else open(os.devnull, "w")  # None: closed at start
        self.failed = False

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):  # ValueError: the stream object itself was closed
                self._go_quiet()
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.failed:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._go_quiet()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ... as the stream has them
        return getattr(self.stream, name)

    def _go_quiet(self) -> None:
        self.failed = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = self.stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)  # what the stream still buffers goes nowhere, without raising at exit
            os.close(devnull)


@contextlib.contextmanager
def output_cannot_fail() -> Iterator[None]:
    """Within it, writes to sys.stdout and sys.stderr never raise (see the module docstring);
    the streams are put back afterwards. Nesting is harmless."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if isinstance(s, QuietOnFailure) else QuietOnFailure(s) for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def survives_closed_output(func: F) -> F:
    """Decorator: run `func` inside output_cannot_fail()."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with output_cannot_fail():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def say(text: str, stream: TextIO | None = None) -> None:
    """Print a line to stream (sys.stderr by default) that may have no reader: a failure is dropped."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(text, file=stream or sys.stderr, flush=True)


def count(n: int, noun: str) -> str:
    """n and the noun, plural unless n is 1: '1 layer', '12 layers' (regular plurals only)."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
