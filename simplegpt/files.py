"""Where simplegpt keeps files of its own, the names of a run folder's files, and how it
fingerprints a file.

It imports nothing of simplegpt, so every layer may use it: accel/ below data and training, and
the run report (simplegpt.report) as well as the trainer that writes the run folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# A run folder's files (simplegpt.training.run_dir writes them, simplegpt.report reads them).
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
PLOT_FILE = "loss.png"
LAST, BEST = "last", "best"  # the latest checkpoint's folder, and the one with the lowest val loss


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
