"""MLflow outage + crash (issue 14, finding 4) through the real entry point and a real
``mlflow server`` (conftest.py): a tiny CAGE W4A4 ZeRO-3 run (1 rank) loses its server after
step 2, is killed with SIGKILL after step 6 (checkpoint at step 4), and is relaunched with the
server back. The relaunch continues the recorded MLflow run: one run, FINISHED, holding every
logged step of every metric exactly once, steps 3-4 recovered from metrics.jsonl."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_resume import cli_args
from testkit import cli_env

pytestmark = pytest.mark.slow

STEPS, KILL_AFTER = 10, 6


def start(out: Path, cache: Path, uri: str, log: Path) -> subprocess.Popen:
    env = cli_env(cache, MLFLOW_TRACKING_URI=uri)
    args = cli_args(out, f"train.steps={STEPS}", "checkpoint.every=4", "data.val_max_blocks=4",
                    "tracking.enabled=true", "tracking.system_metrics=false")  # fmt: skip
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "cage_ds.train", *args], env=env,
                                stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def wait_until(proc: subprocess.Popen, log: Path, done, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended or timed out (rc {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_outage_then_kill9_resumes_into_one_complete_run(server, tmp_path):
    from mlflow import MlflowClient

    server.ensure_running()
    run_dir, client = tmp_path / "out" / "r", MlflowClient(server.uri)
    record = run_dir / "mlflow_run.json"
    first = start(tmp_path / "out", tmp_path / "cache", server.uri, tmp_path / "first.log")
    logged = lambda step: any(r.get("step", 0) >= step and "train/loss" in r  # noqa: E731
                              for r in records(run_dir))  # fmt: skip
    wait_until(first, tmp_path / "first.log", lambda: record.is_file() and logged(2))
    server.stop()
    wait_until(first, tmp_path / "first.log", lambda: logged(KILL_AFTER))
    first.send_signal(signal.SIGKILL)
    first.wait()
    run_id = json.loads(record.read_text())["run_id"]
    server.start()
    before = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    assert before < set(range(1, KILL_AFTER + 1)), "the outage must hide some steps"
    assert client.get_run(run_id).info.status == "RUNNING"

    second = start(tmp_path / "out", tmp_path / "cache", server.uri, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]

    runs = client.search_runs([client.get_experiment_by_name("cage_ds").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    segments: list[list[dict]] = []
    for r in records(run_dir):
        segments.append([]) if r.get("event") == "start" else segments[-1].append(r)
    assert len(segments) == 2 and len(segments[0]) >= KILL_AFTER
    kept = [r for r in segments[0] if r["step"] <= 4] + segments[1]  # resumed at step 4
    want: dict[str, list[tuple[int, float]]] = {}
    for r in kept:
        for key, value in r.items():
            if key != "step":
                want.setdefault(key, []).append((r["step"], value))
    assert sorted(s for s, _ in want["train/loss"]) == list(range(1, STEPS + 1))
    for key, points in want.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == sorted(s for s, _ in points), key  # each step once
        if key == "train/loss":
            assert history == sorted(points)
