"""One trainer per run folder: an exclusive lock held for the whole run.

Two trainers writing one out_dir interleave metrics.jsonl, race on the swap of last/ and leave a
config.toml of one run beside the checkpoint of the other. The trainer therefore takes
`fcntl.flock(LOCK_EX | LOCK_NB)` on out_dir/.lock before it writes anything there (a --resume
included) and holds it until the run ends. The kernel releases a flock when its process dies,
however it dies, so a lock file left by a crashed run is simply taken over: the pid and host
written into it serve only to name the running trainer in the second one's message.
On systems without fcntl (Windows) no lock is taken.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import BinaryIO

from . import TrainingError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunFolderInUse(TrainingError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """The exclusive lock on a run folder; `release()`, the object being collected or the process
    ending gives it up."""

    def __init__(self, out: Path, file: BinaryIO | None):
        self.path = out / LOCK_FILE
        self._file = file  # a file object rather than a bare descriptor: collected, it closes

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the only descriptor releases the flock
            self._file = None

    def remove(self) -> None:
        """Release the lock and delete its file: only for a run folder that is being removed."""
        self.path.unlink(missing_ok=True)
        self.release()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_folder(out: Path) -> RunLock:
    """Make `out` if needed and take its lock. Raises RunFolderInUse naming the process that holds
    it (pid, host, start time), and OSError when the folder cannot be made or written."""
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return RunLock(out, None)
    while True:
        file = open(out / LOCK_FILE, "a+b", buffering=0)  # not "w": the holder's record must stay
        fd = file.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            file.close()
            raise RunFolderInUse(f"run folder {out} is in use by {holder}; wait for that run to end or stop it "
                                 "(Ctrl-C saves a checkpoint), or choose another out_dir") from None
        except BaseException:
            file.close()
            raise
        if _same_file(fd, out / LOCK_FILE):
            break
        file.close()  # a run that gave up removed the file after we opened it: lock the one there now
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only the second trainer's message is vaguer
    return RunLock(out, file)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        pid, host, started = int(record["pid"]), str(record["host"]), str(record["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another simplegpt train process"  # it has the lock but has not written its record yet
    return f"another simplegpt train process (pid {pid} on host {host}, started {started})"
