"""Tracker against a real ``mlflow server`` on loopback (the module-scoped ``server``
fixture of conftest.py, stopped and restarted on the same port and backend to simulate
outages): params, metrics, artifacts and system metrics read back through MlflowClient; an
outage mid-run loses no metric step; an outage through close() lands in the fallback file
and the replay delivers it."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pytest

from cage_ds.train.replay import main, replay
from cage_ds.train.report import save_eval_table, save_loss_curve
from cage_ds.train.tracking import Tracker, flatten_params

pytestmark = pytest.mark.slow


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _fast(server, tmp_path: Path, run_name: str, **kw) -> Tracker:
    """A tracker with short flush/backoff periods so a test sees the retries quickly."""
    options = dict(
        tracking_uri=server.uri,
        fallback_dir=tmp_path / "fallback",
        system_metrics=False,
        flush_interval_s=0.1,
        backoff_s=0.2,
        max_backoff_s=1.0,
        http_timeout_s=3,
    )
    options.update(kw)
    return Tracker("cage-e2e", run_name, **options)


def _wait_delivered(tracker: Tracker, key: str, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tracker.run_id and len(_history(tracker.tracking_uri, tracker.run_id, key)) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{n} points of {key!r} not delivered within {timeout_s} s")


def test_params_metrics_artifacts_system_metrics(server, tmp_path):
    from mlflow import MlflowClient

    server.ensure_running()
    rng = random.Random()
    config = {
        "model": {"preset": "tiny", "dim": 64},
        "optim": {"lr": rng.random(), "betas": [0.9, 0.95]},
        "note": "n" * 7000,
    }
    losses = [(step, rng.uniform(1, 5)) for step in range(25)]
    tracker = _fast(
        server, tmp_path, "roundtrip", system_metrics=True, system_metrics_interval_s=1.0
    )
    tracker.log_params(config)
    tracker.set_tags({"variant": "cage-w4a4"})
    for step, loss in losses:
        tracker.log_metrics({"train/loss": loss, "train/lr": 1e-3 * step}, step=step)
    png = save_loss_curve({"train": losses}, tmp_path / "out" / "loss_curve.png")
    table = save_eval_table([{"split": "val", "loss": 2.0, "ppl": 7.39}], tmp_path / "out" / "e.md")
    tracker.log_artifact(png)
    tracker.log_artifact(table, "eval")
    _wait_delivered(tracker, "train/loss", len(losses))
    time.sleep(2.5)  # a few system-metrics samples at 1 s
    tracker.close()
    assert tracker.fallback_path is None

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "roundtrip"
    assert run.data.params == flatten_params(config)
    assert run.data.tags["variant"] == "cage-w4a4"
    assert _history(server.uri, tracker.run_id, "train/loss") == losses
    assert [s for s, _ in _history(server.uri, tracker.run_id, "train/lr")] == list(range(25))
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert names == {"loss_curve.png", "eval"}
    local = client.download_artifacts(tracker.run_id, "eval/e.md", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == table.read_bytes()


def test_server_stopped_mid_run_loses_no_step(server, tmp_path, caplog):
    server.ensure_running()
    rng = random.Random()
    values = [rng.gauss(3, 1) for _ in range(60)]
    tracker = _fast(server, tmp_path, "outage")
    with caplog.at_level(logging.WARNING, logger="cage_ds.train.tracking"):
        for step in range(20):
            tracker.log_metrics({"train/loss": values[step]}, step=step)
        _wait_delivered(tracker, "train/loss", 20)
        server.stop()
        for step in range(20, 40):
            t0 = time.monotonic()
            tracker.log_metrics({"train/loss": values[step]}, step=step)
            assert time.monotonic() - t0 < 0.5, "logging must not block during an outage"
            time.sleep(0.05)
        server.start()
        for step in range(40, 60):
            tracker.log_metrics({"train/loss": values[step]}, step=step)
        tracker.close()
    assert tracker.fallback_path is None
    assert sum("unreachable (" in r.getMessage() for r in caplog.records) == 1
    assert "reachable again" in caplog.text
    assert _history(server.uri, tracker.run_id, "train/loss") == list(enumerate(values))


def test_outage_through_close_lands_locally_and_replays(server, tmp_path, caplog):
    from mlflow import MlflowClient

    server.ensure_running()
    rng = random.Random()
    values = [rng.gauss(3, 1) for _ in range(30)]
    began_up = _fast(server, tmp_path, "down-at-close", close_timeout_s=1.0)
    began_up.log_params({"seed": 1})
    for step in range(10):
        began_up.log_metrics({"train/loss": values[step]}, step=step)
    _wait_delivered(began_up, "train/loss", 10)
    server.stop()
    began_down = _fast(server, tmp_path, "never-reached", close_timeout_s=0.5)
    began_down.log_params({"seed": 2})
    for step in range(10, 30):
        began_up.log_metrics({"train/loss": values[step]}, step=step)
        began_down.log_metrics({"train/loss": values[step]}, step=step)
    with caplog.at_level(logging.WARNING, logger="cage_ds.train.tracking"):
        began_up.close("FAILED")
        began_down.close()
    assert began_up.fallback_path and began_down.fallback_path
    assert str(began_up.fallback_path) in caplog.text
    assert began_down.run_id is None

    server.start()
    main([str(began_up.fallback_path)])  # the CLI path: same run, recorded URI
    run_id = replay(began_down.fallback_path)
    client = MlflowClient(server.uri)
    first = client.get_run(began_up.run_id)
    assert first.info.status == "FAILED" and first.data.params == {"seed": "1"}
    assert _history(server.uri, began_up.run_id, "train/loss") == list(enumerate(values))
    second = client.get_run(run_id)
    assert second.info.run_name == "never-reached" and second.data.params == {"seed": "2"}
    assert _history(server.uri, run_id, "train/loss") == list(enumerate(values))[10:]
