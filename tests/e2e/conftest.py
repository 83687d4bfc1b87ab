"""Shared end-to-end fixtures: a real ``mlflow server`` on loopback (``server``, one per test
module) that tests stop and restart on the same port and backend to simulate outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from testkit import DIST_ENV, child_env, free_port


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend; start/stop keep port and backend."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.root = root
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        backend = f"sqlite:///{self.root / 'db.sqlite'}"
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(mlflow_bin),
                "server",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**child_env(), "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        # Ready = an API call answers, not just /health: the worker opens its tracking store on
        # the first API call, which takes seconds under load (longer than the 3 s request
        # timeout the trackers of the tests use).
        ready = f"{self.uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_text = (self.root / "server.log").read_text()
                raise RuntimeError(f"mlflow server exited: {log_text}")
            try:
                with urllib.request.urlopen(ready, timeout=30) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} not ready after {timeout_s} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)  # a crash: the server and its worker
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def ensure_running(self) -> None:
        if self.proc is None:
            self.start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _own_rendezvous(monkeypatch):
    """End-to-end tests start their own processes: an in-process distributed test earlier in
    the session may have left RANK/MASTER_PORT/... in os.environ (its port still bound)."""
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
