"""Directories written atomically and durably: built in a hidden sibling, synced, then renamed in.

A write of NAME by writer K (K = a random part and the writer's pid) goes through these states:
    1. `.NAME.tmp-K` is written; its files and folders are fsynced         NAME untouched
    2. the empty folder `.NAME.old-K` is made: `.NAME.tmp-K` is complete     NAME untouched
    3. NAME is moved to `.NAME.old-K/old` (when there is one)                no NAME for a moment
    4. `.NAME.tmp-K` is renamed to NAME, and the parent folder is fsynced    the new NAME in place
    5. `.NAME.old-K` is removed
A crash, SIGKILL or second Ctrl-C at any point leaves a complete copy: `newest_complete` says which
one to read, and `recover` (run by the next write of NAME) puts the newest back at NAME and only
then removes what is left of the interrupted write. A power cut cannot leave a renamed but empty
file, because nothing is renamed before its data is on disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; when the block ends normally it replaces
    `path` (see the module docstring for the steps), otherwise it is removed and `path` is left as it was.
    Folders get the permissions the umask gives (as os.mkdir does). Raises OSError from the file system."""
    path = Path(path)
    make_parent(path)
    recover(path)
    try:
        tmp = _make_unique(path, ".tmp-")
    except OSError as e:  # said of the path the caller named: the hidden folder is nothing to its user
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        yield tmp
        _sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    marker = _sibling(tmp, ".old-")
    marker.mkdir()
    _fsync_dir(path.parent)  # the marker reaches the disk before NAME is moved into it
    _finish(path, tmp, marker)


def make_parent(path: str | os.PathLike) -> None:
    """Make path's folder and the missing ones above it. OSError from the file system; NotADirectoryError
    naming the file that stands where one of those folders must be (mkdir names the folder it wanted)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        file = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(file)) from None


@contextlib.contextmanager
def no_folders_left_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """Inside it, a block that fails removes again the folders it made for `path` (path and those of its
    parents that did not exist when it began, deepest first) that are empty: a write that fails leaves
    no empty data/ behind."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in missing:
            with contextlib.suppress(OSError):  # not made, or not empty: left as it is
                folder.rmdir()
        raise


def newest_complete(path: str | os.PathLike) -> Path | None:
    """The folder to read for `path`: a complete copy not yet renamed in by a writer that is gone
    (newer than `path`), else `path`, else a copy still being renamed in, else the previous copy
    moved aside; None when there is none. Reads only, so it suits read-only folders."""
    path = Path(path)
    done, aside = _interrupted(path)
    gone = [tmp for tmp in done if not _writing(tmp)]
    if gone:
        # `path` too: a later save may have put it in place while this copy's writer seemed alive
        return _newest(gone + ([path] if path.exists() else []))
    if path.exists():
        return path
    return _newest(done) or _newest(aside)


def recover(path: str | os.PathLike) -> Path | None:
    """Finish the writes of `path` that a crash interrupted (of processes that are gone, or of this
    one): the newest complete copy is renamed to `path`, then their leftovers are removed. Returns
    `path` when it exists afterwards, else None. Raises OSError when the folder is not writable."""
    path = Path(path)
    for stale in sorted(path.parent.glob(f".{path.name}.tmp-*"), key=_mtime):
        if not _writing(stale) and not _sibling(stale, ".old-").is_dir():
            shutil.rmtree(stale, ignore_errors=True)  # killed while writing: never complete
    for marker in sorted(path.parent.glob(f".{path.name}.old-*"), key=_mtime):
        if not _writing(marker):
            _finish(path, _sibling(marker, ".tmp-"), marker, interrupted=True)
    return path if path.exists() else None


def _finish(path: Path, tmp: Path, marker: Path, interrupted: bool = False) -> None:
    """Steps 3-5 from wherever a write stopped after step 2; every step can be run again.
    interrupted: finishing another writer's save (recover), whose copy may be older than `path`."""
    aside = marker / "old"
    if interrupted and tmp.is_dir() and path.exists() and not aside.exists() and _mtime(path) > _mtime(tmp):
        pass  # a later save put `path` in place while this writer seemed alive: its copy is the older one
    elif tmp.is_dir():
        if path.exists() and not aside.exists():
            os.replace(path, aside)
        if not path.exists():
            os.replace(tmp, path)
    elif not path.exists() and aside.is_dir():
        os.replace(aside, path)  # its successor is gone: the copy moved aside is the newest left
    _fsync_dir(path.parent)
    shutil.rmtree(tmp, ignore_errors=True)  # only when another copy took its place
    shutil.rmtree(marker, ignore_errors=True)


def _interrupted(path: Path) -> tuple[list[Path], list[Path]]:
    """Complete copies not yet renamed in (their marker exists), and copies moved aside."""
    done, aside = [], []
    for marker in path.parent.glob(f".{path.name}.old-*"):
        tmp = _sibling(marker, ".tmp-")
        if tmp.is_dir():
            done.append(tmp)
        if (marker / "old").is_dir():
            aside.append(marker / "old")
    return done, aside


def _make_unique(path: Path, kind: str) -> Path:
    while True:
        candidate = path.with_name(f".{path.name}{kind}{secrets.token_hex(4)}.pid{os.getpid()}")
        try:
            candidate.mkdir()  # mode 0o777 less the umask, unlike mkdtemp's 0o700
            return candidate
        except FileExistsError:
            continue


def _sibling(leftover: Path, kind: str) -> Path:
    """`.NAME.tmp-K` <-> `.NAME.old-K`: the same writer's other folder."""
    other = ".old-" if kind == ".tmp-" else ".tmp-"
    return leftover.with_name(leftover.name.replace(other, kind, 1))


def _writing(leftover: Path) -> bool:
    """Whether another live process may still be writing this leftover (named after its pid). A
    process that started after the leftover was last changed is not its writer but a later one
    given the same pid (a dead writer's pid is reused), so the leftover is a crash's."""
    pid = leftover.name.rsplit(".pid", 1)[-1] if ".pid" in leftover.name else ""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # it exists but belongs to someone else
    age = _process_age(int(pid))
    return age is None or age + _AGE_SLACK_S >= time.time() - _mtime(leftover) / 1e9


_AGE_SLACK_S = 1.0  # /proc counts a process's start in clock ticks; file times may be coarse


def _process_age(pid: int) -> float | None:
    """How many seconds ago process `pid` started, from Linux's /proc (its start and the uptime,
    both on the clock since boot, which the wall clock's adjustments do not move); None where that
    cannot be read (another system, a process that just ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _newest(folders: list[Path]) -> Path | None:
    return max(folders, key=_mtime, default=None)


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def _sync_tree(root: Path) -> None:
    """fsync every file under root, then every folder, deepest first, so renaming root publishes data on disk."""
    folders = []
    for folder, _, files in os.walk(root):
        folders.append(folder)
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in reversed(folders):
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":
        return  # Windows cannot open a folder to fsync it; its renames are journaled by NTFS
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
