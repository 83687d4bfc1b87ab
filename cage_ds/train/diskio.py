"""Run-file writes that survive a full disk: whole-line appends and a named "disk full" error.

- ``append_line``: one ``os.write`` of the whole line on an ``O_APPEND`` descriptor; a short
  write (the disk filled mid-line) is cut back off, so the file holds whole lines only.
- ``repair_torn_tail``: a file that still ends in a fragment (a kill or an older version
  mid-write) loses that fragment, with a warning, before the next line is appended.
- ``disk_full_guard``: ENOSPC / EDQUOT inside the block becomes ``DiskFullError``, one line
  naming "disk full", the path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space (or quota) left while writing a run file; the message names the path."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_message(path: str | os.PathLike) -> str:
    return (
        f"disk full (no space or quota left) writing {path}: free space there and relaunch; "
        "the run resumes from its last complete checkpoint"
    )


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise ENOSPC/EDQUOT in the block as DiskFullError naming the failing file (the
    error's own filename when it has one, else ``path``)."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        raise DiskFullError(err.errno, disk_full_message(err.filename or path)) from err


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut a trailing fragment (text after the last newline) off ``path``, warning; returns
    the bytes removed (0 when the file is whole or absent)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return 0
        fh.seek(0)
        data = fh.read()
        size, keep = len(data), data.rfind(b"\n") + 1
        fh.truncate(keep)
    logger.warning(
        "%s ended in a torn record (%d bytes after the last newline, from a crash or a full "
        "disk): dropped",
        path,
        size - keep,
    )
    return size - keep


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` + newline as one write: the file gains the whole line or nothing
    (DiskFullError, or the OSError, otherwise)."""
    data = (line + "\n").encode()
    with disk_full_guard(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
            except OSError:
                os.ftruncate(fd, start)
                raise
            if written != len(data):  # a short write: the disk filled mid-line
                os.ftruncate(fd, start)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        finally:
            os.close(fd)
