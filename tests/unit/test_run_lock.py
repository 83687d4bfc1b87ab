"""The run-dir lock: a second live run is refused naming the holder's pid and host; a killed
holder's stale lock is taken over with a note; a clean release leaves no record."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import cage_train, child_env

from cage_ds.train.run_lock import LOCK_NAME, RunLock, RunLockError

HOLD = (
    "import sys, time\n"
    "from cage_ds.train.run_lock import RunLock\n"
    "lock = RunLock(sys.argv[1])\n"
    "lock.acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def start_holder(run_dir: Path) -> subprocess.Popen:
    """A separate process that takes the lock and keeps it (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
        env={**child_env(), "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_live_holder_is_named_then_its_stale_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    holder = start_holder(run_dir)
    try:
        with pytest.raises(RunLockError) as info:
            RunLock(run_dir).acquire()
        message = str(info.value)
        assert message.startswith(
            f"run dir {run_dir} is in use by another cage-train run: pid {holder.pid} on host "
            f"{socket.gethostname()} (started "
        )
        assert message.endswith("or choose another train.run_name or train.output_dir")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # killed: no clean release
        holder.wait()
    with RunLock(run_dir) as lock:
        assert lock.note.startswith(
            f"took over the stale lock {run_dir / LOCK_NAME} of pid {holder.pid} on host "
        )
        assert str(os.getpid()) in (run_dir / LOCK_NAME).read_text()
    assert (run_dir / LOCK_NAME).read_text() == ""  # clean release
    with RunLock(run_dir) as lock:
        assert lock.note is None


def test_second_lock_in_one_process_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockError, match=f"pid {os.getpid()} on host"):
            RunLock(tmp_path).acquire()


@pytest.mark.slow
def test_cage_train_refuses_a_run_dir_in_use(tmp_path):
    from cage_ds.train.config import CONFIGS_DIR

    holder = start_holder(tmp_path / "r")
    try:
        proc = cage_train("--config", CONFIGS_DIR / "experiments" / "cage_w4a4.yaml",
                          "train.steps=2", f"train.output_dir={tmp_path}", "train.run_name=r",
                          timeout=300)  # fmt: skip
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"cage-train: run dir {tmp_path / 'r'} is in use by another cage-train run: pid " \
           f"{holder.pid} on host" in proc.stderr  # fmt: skip
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
