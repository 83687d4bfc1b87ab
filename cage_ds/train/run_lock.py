"""One run at a time per run dir: an OS lock on ``<run_dir>/cage-train.lock``.

Rank 0 takes an exclusive ``fcntl.flock`` on the lock file and keeps it open for the whole
run; the kernel drops it when the process ends, however it ends, so a lock can never outlive
its holder. The holder writes its pid, host and start time into the file (for the message a
second run gets) and empties it on a clean release: a record found by a run that does get
the lock is therefore a stale one, left by a process that was killed, and is taken over with
a note. On NFS (Linux >= 2.6.12) flock is emulated with fcntl locks and so holds across hosts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

LOCK_NAME = "cage-train.lock"
"""The lock file under a run dir."""


class RunLockError(RuntimeError):
    """Another live run holds the run dir (the message names its pid and host)."""


def _describe(record: str) -> str:
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on host {holder['host']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process (no holder recorded yet)"


class RunLock:
    """Exclusive lock of a run dir, held from ``acquire`` to ``release`` (or the process's end).

    Example::

        with RunLock(run_dir) as lock:   # RunLockError if another run holds it
            if lock.note:                # a killed run's stale lock was taken over
                print(lock.note)
            ...
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.note: str | None = None
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock (creating the run dir); RunLockError naming the holder if it is
        held. Sets ``note`` when a stale record of a killed run was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fh.read().strip())
            fh.close()
            raise RunLockError(
                f"run dir {self.path.parent} is in use by another cage-train run: {holder} holds "
                f"{self.path}; wait for it to end or stop it, or choose another train.run_name "
                "or train.output_dir"
            ) from None
        previous = fh.read().strip()
        if previous:
            self.note = (
                f"took over the stale lock {self.path} of {_describe(previous)}, which ended "
                "without releasing it"
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        self._file = fh

    def release(self) -> None:
        """Empty the record (a clean end) and drop the lock; no-op when not held."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.close()  # closing drops the flock
        self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
