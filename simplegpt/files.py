"""Where simplegpt keeps files of its own, and how it fingerprints a file.

It imports nothing of simplegpt, so every layer may use it (accel/ below, data and training above).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """simplegpt's cache folder (downloads, the C kernels' builds): $SIMPLEGPT_CACHE, else
    $XDG_CACHE_HOME/simplegpt, else ~/.cache/simplegpt. Not created here."""
    env = os.environ.get("SIMPLEGPT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simplegpt"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 digest of a file's bytes, read in chunks. OSError when it cannot be read."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
