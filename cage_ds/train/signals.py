"""Stop signals and clean-up: SIGTERM as an exception, and clean-up that a signal cannot cut.

The DeepSpeed launcher stops the ranks with SIGTERM (SIGKILL 30 s later) when it is killed or
a rank fails, and may send it twice; Python's default SIGTERM action ends the process at once,
leaving the MLflow run RUNNING with its buffer lost and the run dir lock behind.

- ``sigterm_as_exit()``: SIGTERM raises ``SystemExit(128 + SIGTERM)`` (exit status 143, as a
  shell reports a SIGTERM death) in the main thread, so ``finally`` blocks run.
- ``stop_signals_held()``: SIGINT / SIGTERM arriving inside the block (a clean-up, e.g. the
  tracker's close) wait until it ends, then the first one takes effect as it would have.
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


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block; after it, re-raise the first one held under the
    handlers restored. Off the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])
