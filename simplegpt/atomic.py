"""Directories written atomically: built in a temporary sibling, then swapped in with os.replace.

A crash (or SIGKILL) mid-write leaves the directory that was there before untouched; only a
hidden `.NAME.tmp-*` sibling may stay behind, and the next write of NAME removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; when the block ends normally it replaces
    `path` (the old one is moved aside first and removed last), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", suffix=f".pid{os.getpid()}", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", suffix=f".pid{os.getpid()}", dir=path.parent))
        os.replace(path, aside / "old")
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_leftovers(path: Path) -> None:
    """Temp dirs of writes of `path` that were killed (by pid: only those whose process is gone)."""
    for prefix in (f".{path.name}.tmp-", f".{path.name}.old-"):
        for stale in path.parent.glob(prefix + "*"):
            pid = stale.name.rsplit(".pid", 1)[-1] if ".pid" in stale.name else ""
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
