"""The project's own exceptions: the CLI turns these, and only these, into one line on stderr and
a non-zero exit (exit_code). Any other exception reaching the CLI is a bug and keeps its traceback.

Most of them also subclass the built-in type a library caller would expect (ValueError for a bad
value, ImportError for a missing package), so `except ValueError` in user code still catches them.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

# The errors of a write that found no room: a full disk, a quota, a file-size limit.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class SimpleGPTError(Exception):
    """Base class for errors whose message is meant for the user as it is."""

    exit_code = 1  # bad input or data; 2 is for a command line that does not say what to do


class UsageError(SimpleGPTError):
    """The command line does not say what to do (an input is missing), as argparse's own errors: exit 2."""

    exit_code = 2


class OptionError(SimpleGPTError, ValueError):
    """A command-line option's value cannot be used: out of its range, or in conflict with another option."""


class CheckpointError(SimpleGPTError, ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or incompatible."""


class ConfigError(SimpleGPTError, ValueError):
    """A configuration file or command-line override is invalid."""


class DataError(SimpleGPTError, ValueError):
    """Input data (a corpus, a dataset, a prompt) is missing, empty or unusable."""


class UnknownCharacterError(DataError):
    """Text holds characters that a character-level vocabulary has no token for (`chars`: them, in order
    of first appearance); the message names them."""

    def __init__(self, message: str, chars: str = "") -> None:
        super().__init__(message)
        self.chars = chars


class DeviceError(SimpleGPTError, ValueError):
    """A device name that is not a device, or a device this machine does not have."""


class MissingDependencyError(SimpleGPTError, ImportError):
    """An optional package (one of the extras) is not installed; the message says what to install."""


class OutputExistsError(SimpleGPTError, FileExistsError):
    """An output path already holds something that would be replaced; the message names the way out."""


class FileAccessError(SimpleGPTError):
    """A file or folder the user named cannot be read or written (permission denied, disk full, ...)."""


@contextlib.contextmanager
def file_access_errors() -> Iterator[None]:
    """Inside it, an OSError that names a file becomes a FileAccessError ('PATH: reason'). For a
    command's boundary, around reading and writing the paths its user gave: what goes wrong there is
    the machine's state, not a bug. An OSError without a file name (a socket, a bug) passes through."""
    try:
        yield
    except OSError as e:
        if e.filename is None or isinstance(e, SimpleGPTError):
            raise
        raise FileAccessError(f"{e.filename}: {e.strerror or e}") from e
