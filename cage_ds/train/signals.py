"""SIGTERM as an exception, so that a stopped run still runs its ``finally`` blocks.

The DeepSpeed launcher stops the ranks with SIGTERM (and SIGKILL 30 s later) when it is killed
or a rank fails; Python's default SIGTERM action ends the process at once, leaving the MLflow
run RUNNING with its buffer lost and the run dir lock behind. Inside ``sigterm_as_exit()``
SIGTERM raises ``SystemExit(128 + SIGTERM)`` (exit status 143, as a shell reports a SIGTERM
death) in the main thread instead: the tracker closes as KILLED, the lock is released.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_STATUS = 128 + signal.SIGTERM


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_STATUS)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143); the previous handler is restored
    after it. Off the main thread (where Python cannot set handlers) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
