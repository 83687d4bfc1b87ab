"""launch/cpu_single_node.sh (the DeepSpeed launcher, 2 ranks) with a probe module that joins
the process group through cage_ds.train.loop.init_distributed (issue 14, findings 8 and 9):
the rendezvous store of a single-node run listens on 127.0.0.1 only, and killing the launcher
(SIGTERM to the ``deepspeed`` process, SIGINT to the script's process group) takes the ranks
with it, so that a relaunch on the same MASTER_PORT starts at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from testkit import child_env, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

PROBE = '''
"""Joins through init_distributed; rank 0 lists the listening sockets of MASTER_PORT."""
import json, os, time
from pathlib import Path
import torch.distributed as dist
from cage_ds.train.loop import init_distributed

out, port = Path(os.environ["PROBE_OUT"]), int(os.environ["MASTER_PORT"])
rank, world = init_distributed()
if rank == 0:
    rows = []
    for name in ("tcp", "tcp6"):
        for line in Path("/proc/net", name).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                rows.append([name, address])
    (out / "listen.json").write_text(json.dumps(rows))
dist.barrier()
(out / f"pid{rank}").write_text(str(os.getpid()))
while os.environ.get("PROBE_HANG") == "1":  # "training" until killed
    time.sleep(0.2)
dist.destroy_process_group()
'''


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "cage_signal_probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    env = {**child_env(), "OMP_NUM_THREADS": "1", "CAGE_SKIP_CHECK": "1", "NPROC": "2",
           "CAGE_TRAIN_MODULE": "cage_signal_probe", "PROBE_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "MASTER_PORT": str(free_port())}  # fmt: skip
    return out, env


def launch(env: dict, log: Path, **extra: str) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(
            ["bash", "launch/cpu_single_node.sh", "--config", "unused.yaml"],
            cwd=ROOT, env={**env, **extra}, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def test_single_node_rendezvous_listens_on_loopback_only(probe, tmp_path):
    out, env = probe
    proc = launch(env, tmp_path / "log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    assert json.loads((out / "listen.json").read_text()) == [["tcp", "0100007F"]]


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def deepspeed_launcher(script: subprocess.Popen) -> int:
    """The pid of the ``deepspeed`` runner (the script itself, or one of its children)."""
    import psutil

    root = psutil.Process(script.pid)
    for proc in [root, *root.children(recursive=True)]:
        if "--num_accelerators" in proc.cmdline():
            return proc.pid
    raise AssertionError("no deepspeed launcher process under the launch script")


def test_killing_the_launcher_takes_the_ranks_along(probe, tmp_path):
    """SIGTERM to the ``deepspeed`` runner alone (not its group) stops the ranks too."""
    out, env = probe
    job = launch(env, tmp_path / "job.log", PROBE_HANG="1")
    deadline = time.monotonic() + 300
    while not all((out / f"pid{r}").is_file() for r in (0, 1)):
        log = (tmp_path / "job.log").read_text()[-3000:]
        assert job.poll() is None and time.monotonic() < deadline, log
        time.sleep(0.1)
    ranks = [int((out / f"pid{r}").read_text()) for r in (0, 1)]
    os.kill(deepspeed_launcher(job), signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in ranks if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived the launcher"
    job.wait(timeout=30)

    for r in (0, 1):
        (out / f"pid{r}").unlink()
    again = launch(env, tmp_path / "again.log")  # the same MASTER_PORT
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert all((out / f"pid{r}").is_file() for r in (0, 1))
