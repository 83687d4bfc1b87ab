"""testkit's launches: the forked ones (spawn_ranks, run_python) behave as the processes they
replace: a failing rank fails the job with its traceback and stops the others; a module run
forked gives the same exit status and output as ``python -m`` in a fresh interpreter.
torchrun relaunches once, warning, only when a rank aborted in native code."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from testkit import child_env, run_python, spawn_ranks, torchrun

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


ABORT_ONCE = """import os, sys
marker = os.path.join(sys.argv[1], "rank" + os.environ["RANK"])
if sys.argv[2] == "always" or not os.path.exists(marker):
    open(marker, "w").close()
    if os.environ["RANK"] == "1":
        os.abort()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["once", "always"])
def test_torchrun_relaunches_once_after_a_native_abort(tmp_path, mode):
    script = tmp_path / "abort_once.py"
    script.write_text(ABORT_ONCE)
    if mode == "once":
        with pytest.warns(UserWarning, match="aborted in native code, relaunching once"):
            assert torchrun(2, str(script), str(tmp_path), mode, timeout=300).returncode == 0
    else:
        with pytest.warns(UserWarning), pytest.raises(AssertionError, match="launch failed"):
            torchrun(2, str(script), str(tmp_path), mode, timeout=300)


@pytest.mark.slow
def test_torchrun_fails_at_once_on_a_python_error(tmp_path, recwarn):
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(AssertionError, match="launch failed"):
        torchrun(2, str(script), timeout=300)
    assert not [w for w in recwarn if "relaunching" in str(w.message)]
