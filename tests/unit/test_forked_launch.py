"""testkit's forked launches (spawn_ranks, run_python) behave as the processes they replace:
a failing rank fails the job with its traceback and stops the others; a module run forked
gives the same exit status and output as ``python -m`` in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from testkit import child_env, run_python, spawn_ranks

from cage_ds.train.config import CONFIGS_DIR


def _rank_fails_or_waits(rank: int, marker: str) -> None:
    if rank == 1:
        raise ValueError(marker)
    time.sleep(600)  # stopped by spawn_ranks once rank 1 failed


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_and_stops_the_others():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        spawn_ranks(_rank_fails_or_waits, ("boom-7f3",), world=3)
    assert time.monotonic() - start < 120
    text = str(info.value)
    assert "--- rank 1 (exit 1) ---" in text and "ValueError: boom-7f3" in text
    assert "rank 0 (exit -9)" in text and "rank 2 (exit -9)" in text  # killed, not left running


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["--check", "--world-size", "2", "train.steps=5"],
        ["optim.lamda=3"],  # a config error: exit 2, the message on stderr
    ],
    ids=["check", "config-error"],
)
def test_forked_module_run_equals_a_fresh_interpreter(args, tmp_path):
    argv = ["--config", str(CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"), *args]
    env = {**child_env(), "PYTHONWARNINGS": "ignore"}
    fresh = subprocess.run([sys.executable, "-m", "cage_ds.train", *argv], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    forked = run_python("-m", "cage_ds.train", *argv, env=env, cwd=tmp_path, timeout=300)
    check = "--check" in args
    assert forked.returncode == fresh.returncode == (0 if check else 2), fresh.stderr
    assert forked.stdout == fresh.stdout
    assert ("# resolved config" in fresh.stdout) if check else ("config error" in fresh.stderr)
    # the last line: the config error (stderr may start with import-time warnings)
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]
