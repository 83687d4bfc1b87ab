"""MLflow run continuity (cage_ds.train.run_record, the Tracker's continuation, replay) on a
local sqlite store: the recorded run id, the lineage read back from metrics.jsonl, one point
per (key, step) in a continued run, the gap warning, and a replay that never lands in a second
run when the server fails transiently (issue 14, findings 4 and 11)."""

from __future__ import annotations

import json
import logging
import random

import pytest

from cage_ds.train.replay import replay
from cage_ds.train.run_record import (
    Continuation,
    lineage_points,
    read_run_id,
    retire_fallbacks,
    step_ranges,
    write_run_record,
)
from cage_ds.train.tracking import Tracker


def test_record_roundtrip_and_other_server(tmp_path, caplog):
    path = tmp_path / "mlflow_run.json"
    assert read_run_id(path, "uri", "exp") is None
    write_run_record(path, "abc", "uri", "exp")
    assert read_run_id(path, "uri", "exp") == "abc"
    assert not list(tmp_path.glob("*.tmp"))
    with caplog.at_level(logging.WARNING):
        assert read_run_id(path, "other-uri", "exp") is None
    assert "other-uri" in caplog.text


def test_lineage_points_from_the_last_fresh_start(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"event": "start", "step": 0}, {"step": 1, "loss": 9.0},  # an older lineage
             {"event": "start", "step": 0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
             {"step": 3, "loss": 3.0}, {"event": "start", "step": 2}, {"step": 3, "loss": 3.5},
             {"step": 3, "val": 0.5}]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert sorted(lineage_points(log, 3)) == [
        ("loss", 1.0, 1), ("loss", 2.0, 2), ("loss", 3.5, 3), ("val", 0.5, 3)]  # fmt: skip
    assert sorted(lineage_points(log, 1)) == [("loss", 1.0, 1)]
    assert lineage_points(tmp_path / "absent.jsonl", 5) == ()


def test_step_ranges():
    assert step_ranges([9, 3, 5, 4, 11, 12]) == "3-5, 9, 11-12"


def test_retire_fallbacks_of_the_run_only(tmp_path):
    for name, run_id in (("mine", "r1"), ("never", None), ("other", "r2")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"kind": "run", "run_id": run_id}))
    retired = retire_fallbacks(tmp_path, "r1")
    assert sorted(p.name for p in retired) == ["mine.jsonl.recovered", "never.jsonl.recovered"]
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["other.jsonl"]


def _tracker(tmp_path, **kw) -> Tracker:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return Tracker("exp", "r", tracking_uri=uri, fallback_dir=tmp_path / "fallback",
                   system_metrics=False, flush_interval_s=0.05,
                   run_record=tmp_path / "mlflow_run.json", **kw)  # fmt: skip


def _crash(tracker: Tracker) -> None:
    """Deliver what is buffered, then drop the tracker as a kill -9 would (no close)."""
    import atexit

    assert tracker._deliver()
    atexit.unregister(tracker._close_at_exit)
    tracker._closed = True
    tracker._stop.set()


def _history(tracker: Tracker, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracker.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))


def test_continued_run_holds_every_step_once_and_names_its_gap(tmp_path, caplog):
    from mlflow import MlflowClient

    rng = random.Random()
    loss = {s: rng.uniform(1, 5) for s in range(1, 9)}
    first = _tracker(tmp_path)
    for step in (1, 2, 5):  # delivered before the crash (step 5 recomputed after it)
        first.log_metrics({"loss": loss[step]}, step=step)
    first.log_params({"lr": 1})
    _crash(first)  # the run stays RUNNING
    run_id = read_run_id(tmp_path / "mlflow_run.json", first.tracking_uri, "exp")
    assert run_id == first.run_id
    MlflowClient(first.tracking_uri).set_terminated(run_id, "FAILED")

    local = tuple(("loss", loss[s], s) for s in (1, 2, 4))  # step 3 lost everywhere
    second = _tracker(tmp_path, continuation=Continuation(run_id, local, 4))
    second.log_params({"lr": 1})
    with caplog.at_level(logging.WARNING, logger="cage_ds.train.tracking"):
        for step in range(5, 9):
            second.log_metrics({"loss": loss[step]}, step=step)
        second.close()
    assert second.run_id == run_id and second.fallback_path is None
    assert "steps 3 have no metric point" in caplog.text
    run = MlflowClient(first.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "1"}
    assert _history(second, "loss") == [(s, loss[s]) for s in (1, 2, 4, 5, 6, 7, 8)]


def test_replay_after_a_transient_error_keeps_to_the_recorded_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracker = _tracker(tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=1)
    _crash(tracker)
    tracker._buffer.metrics.append(("loss", 2.0, 0, 2))  # undelivered at the "close"
    fallback = tracker._write_fallback("FAILED")
    real_get_run = MlflowClient.get_run

    def timeout(self, run_id):
        raise MlflowException("API request to /runs/get failed with exception ReadTimeout")

    monkeypatch.setattr(MlflowClient, "get_run", timeout)
    with pytest.raises(MlflowException, match="ReadTimeout"):
        replay(fallback)
    monkeypatch.setattr(MlflowClient, "get_run", real_get_run)
    client = MlflowClient(tracker.tracking_uri)
    experiment = client.get_experiment_by_name("exp").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [tracker.run_id]
    assert replay(fallback) == tracker.run_id
    assert replay(fallback) == tracker.run_id  # twice: still one point per step
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert _history(tracker, "loss") == [(1, 1.0), (2, 2.0)]
