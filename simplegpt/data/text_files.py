"""A local corpus's files (for data.sources): finding them with a glob, and reading a large text
file in pieces.

`glob_files(pattern)` is glob.glob's answer, files only, except that a recursive `**` follows
symbolic links to folders without ever entering a folder it is already inside (a link back up the
tree would otherwise never end), and a file reached by several paths is listed once.

`text_pieces(path)` reads a UTF-8 text file (a leading byte-order mark dropped, line ends read as
Python's text mode reads them: \\r\\n and \\r as \\n) in pieces of about PIECE_CHARS characters, so
that a file of any size, one line long or not, is never held whole. Every piece but the last is a
`Part`. A file is cut just before a single space or line end that stands between two characters
that are not white space: every tokenizer of simplegpt's (characters, bytes, GPT-2's BPE and the
trained byte-level BPE, whose pre-tokenizer, GPT-2's, never joins text across such a place) encodes the pieces into the same tokens as the
whole text. A piece without such a place in its last CUT_SEARCH_CHARS characters (no white space
there: not prose) is cut at a character boundary, which is exact for the character and byte
tokenizers.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
from pathlib import Path
from typing import Iterator

from ..errors import DataError

PIECE_CHARS = 1 << 20
CUT_SEARCH_CHARS = 1 << 16
_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


class Part(str):
    """A piece of a document that goes on in the next piece: it gets no end-of-text token of its own."""


def text_pieces(path: Path, piece_chars: int | None = None) -> Iterator[str]:
    """The text of `path` in pieces of about piece_chars (default PIECE_CHARS) characters (see the
    module docstring): one plain str when the file is short, else Parts and a last plain str, none
    of them empty but the text of an empty file. Raises DataError when the file is not UTF-8."""
    piece_chars = piece_chars or PIECE_CHARS
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read(piece_chars)
            while True:
                ahead = f.read(piece_chars)
                if not ahead:
                    yield text
                    return
                end = len(text)
                text += ahead
                cut = _cut(text, end)
                yield Part(text[:cut])
                text = text[cut:]  # at most two pieces are held
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 first") from None


def _cut(text: str, end: int) -> int:
    """Where to cut text (`end` >= 1 characters of it and more): the last place of _CUT before
    `end`, looked for in its last CUT_SEARCH_CHARS characters (a short stretch first, as prose has
    one every few characters), else `end` itself (a character boundary)."""
    for back in (1 << 10, CUT_SEARCH_CHARS):
        last = None
        for last in _CUT.finditer(text, max(0, end - back), end + 1):
            pass
        if last is not None:
            return last.start()
    return end


def glob_files(pattern: str) -> list[Path]:
    """The files (regular files, symbolic links to them included) a glob pattern matches, sorted,
    each file once (see the module docstring)."""
    paths = _recursive_glob(pattern) if "**" in pattern else glob.iglob(pattern)
    files, seen = [], set()
    for path in sorted({Path(p) for p in paths}):
        try:
            st = path.stat()
        except OSError:  # a dangling link, or gone meanwhile
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            files.append(path)
    return files


def _recursive_glob(pattern: str) -> Iterator[str]:
    """glob.glob(pattern, recursive=True)'s paths (names starting with '.' matched only by parts
    that start with '.'), except that `**` never enters a folder it is already inside."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:first])
    if first and not root:  # the pattern starts at the file system's root
        root = os.sep
    if root and not os.path.isdir(root):
        return
    yield from _walk(root, parts[first:], frozenset({_identity(root or os.curdir)}))


def _identity(folder: str) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(base: str, parts: list[str], inside: frozenset) -> Iterator[str]:
    """The paths under base that match parts; inside: the folders the walk is in now (their identities)."""
    if not parts:
        yield base
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        yield from _walk(base, rest, inside)  # no folder at all
        for name in _names(base, hidden=False):
            path = os.path.join(base, name)
            if os.path.isdir(path):
                ident = _identity(path)
                if ident not in inside:
                    yield from _walk(path, parts, inside | {ident})
            elif not rest:  # a trailing ** matches the files too
                yield path
        return
    if glob.has_magic(part):
        names = [n for n in _names(base, hidden=part.startswith(".")) if fnmatch.fnmatch(n, part)]
    else:
        names = [part] if os.path.lexists(os.path.join(base, part)) else []
    for name in names:
        path = os.path.join(base, name)
        if not rest:
            yield path
        elif os.path.isdir(path):
            yield from _walk(path, rest, inside | {_identity(path)})


def _names(folder: str, hidden: bool) -> list[str]:
    try:
        names = os.listdir(folder or os.curdir)
    except OSError:
        return []
    return sorted(n for n in names if hidden or not n.startswith("."))
