"""Unit tests for cage_ds.train.tracking without a server: flattening and limits, the local
sqlite default, the outage fallback file and its replay (cage_ds.train.replay), the no-op twin,
the close on every exit (``with tracker``, SIGTERM) and the interpreter-exit fallback."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from testkit import free_port

from cage_ds.train import tracking
from cage_ds.train.replay import main as replay_main
from cage_ds.train.replay import replay
from cage_ds.train.report import save_eval_table, save_loss_curve
from cage_ds.train.signals import sigterm_as_exit
from cage_ds.train.tracking import (
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    NullTracker,
    Tracker,
    exit_status,
    flatten_params,
    make_tracker,
    sanitize_key,
)


def _closed_port_uri() -> str:
    """An http URI on loopback where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    rows = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in rows)


def test_flatten_params_nested_lists_limits():
    long_value = "x" * (MAX_PARAM_VALUE_LENGTH + 17)
    long_key_a = "k" * 300 + "a"
    long_key_b = "k" * 300 + "b"
    flat = flatten_params(
        {
            "model": {"dim": 64, "layers": [1, 2], "rope": {"theta": 1e4}},
            "lr": 0.001,
            "weird key!": True,
            "long": long_value,
            "deep": {long_key_a: 1, long_key_b: 2},
        }
    )
    assert flat["model.dim"] == "64"
    assert flat["model.layers"] == "[1, 2]"
    assert flat["model.rope.theta"] == "10000.0"
    assert flat["weird key_"] == "True"
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH
    assert flat["long"].endswith("...[truncated]")
    long_keys = [k for k in flat if k.startswith("deep.")]
    assert len(long_keys) == 2 and all(len(k) == MAX_KEY_LENGTH for k in long_keys)
    assert sanitize_key("a/b.c-d e:f_g") == "a/b.c-d e:f_g"


def test_param_relogged_with_other_value_is_an_error(tmp_path):
    tracker = Tracker(
        "exp",
        "r",
        tracking_uri=_closed_port_uri(),
        fallback_dir=tmp_path,
        system_metrics=False,
        close_timeout_s=0,
    )
    tracker.log_params({"a": {"b": 1}})
    tracker.log_params({"a": {"b": 1}})  # same value: fine
    with pytest.raises(ValueError, match=r"'a\.b' already logged as '1'"):
        tracker.log_params({"a": {"b": 2}})
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        tracker.log_metrics({"loss": 1.0}, step=-1)
    tracker.close()
    with pytest.raises(RuntimeError, match="is closed"):
        tracker.log_metrics({"loss": 1.0}, step=1)


def test_local_sqlite_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = random.Random()
    values = [rng.uniform(0, 10) for _ in range(7)]
    tracker = Tracker("exp", "local", system_metrics=False)
    tracker.log_params({"train": {"steps": 7}})
    for step, value in enumerate(values):
        tracker.log_metrics({"train/loss": value}, step=step)
    artifact = save_eval_table([{"split": "val", "loss": 1.5}], tmp_path / "eval.md")
    tracker.log_artifact(artifact)
    tracker.close()
    assert tracker.fallback_path is None
    from mlflow import MlflowClient

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.steps": "7"}
    assert _history(tracker.tracking_uri, tracker.run_id, "train/loss") == list(enumerate(values))
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["eval.md"]
    assert (tmp_path / "mlruns").is_dir()


def test_unreachable_server_falls_back_then_replays(tmp_path, caplog, capsys):
    rng = random.Random()
    points = [(step, rng.gauss(0, 1)) for step in range(0, 2500, 1)]  # > one log_batch
    curve = save_loss_curve({"train": points[:50]}, tmp_path / "art" / "loss.png")
    tracker = Tracker(
        "exp-fallback",
        "down",
        tracking_uri=_closed_port_uri(),
        fallback_dir=tmp_path / "fb",
        system_metrics=False,
        flush_interval_s=0.05,
        backoff_s=0.05,
        close_timeout_s=0.3,
    )
    with caplog.at_level(logging.WARNING, logger="cage_ds.train.tracking"):
        tracker.log_params({"seed": 3})
        tracker.set_tags({"variant": "cage"})
        for step, value in points:
            tracker.log_metrics({"loss": value, "nan_metric": float("nan")}, step=step)
        tracker.log_artifact(curve, "plots")
        tracker.close("KILLED")
    unreachable = [r for r in caplog.records if "unreachable (" in r.getMessage()]
    assert len(unreachable) == 1, "the outage must be warned about exactly once"
    path = tracker.fallback_path
    assert path is not None and path.exists()
    assert str(path) in caplog.text and "cage_ds.train.replay" in caplog.text
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["kind"] == "run" and records[0]["status"] == "KILLED"
    assert sum(r["kind"] == "metric" for r in records) == 2 * len(points)

    target = f"sqlite:///{tmp_path / 'replay.db'}"
    bad = tmp_path / "not-a-fallback.jsonl"
    bad.write_text(json.dumps({"kind": "metric"}) + "\n")
    with pytest.raises(ValueError, match="no 'run' header line"):
        replay(bad)
    capsys.readouterr()
    replay_main([str(path), "--tracking-uri", target])  # the CLI: prints the run id
    run_id = capsys.readouterr().out.strip()
    from mlflow import MlflowClient

    client = MlflowClient(target)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "down"
    assert run.data.params == {"seed": "3"} and run.data.tags["variant"] == "cage"
    assert _history(target, run_id, "loss") == points
    nan_rows = client.get_metric_history(run_id, "nan_metric")
    assert len(nan_rows) == len(points)
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss.png"]


def test_make_tracker_null_twin(tmp_path):
    assert isinstance(make_tracker(True, 1, "exp", "r"), NullTracker)
    assert isinstance(make_tracker(False, 0, "exp", "r"), NullTracker)
    null = NullTracker()
    null.log_params({"a": 1})
    null.log_metrics({"loss": 1.0}, step=0)
    null.log_artifact(tmp_path)
    null.set_tags({"t": 1})
    null.close()
    assert null.run_id is None and null.fallback_path is None
    tracker = make_tracker(
        True,
        0,
        "exp",
        "r",
        tracking_uri=_closed_port_uri(),
        fallback_dir=tmp_path,
        system_metrics=False,
        close_timeout_s=0,
    )
    assert isinstance(tracker, Tracker)
    tracker.close()


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory) -> str:
    """One sqlite store for the module's short runs (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


class Stop(Exception):
    """Stands in for the error a training step raises."""


@pytest.mark.parametrize(
    ("raised", "status"),
    [(None, "FINISHED"), (Stop, "FAILED"), (KeyboardInterrupt, "KILLED"), (SystemExit, "KILLED")],
)
def test_with_block_closes_the_run_as_its_exit(shared_db, tmp_path, raised, status):
    from mlflow import MlflowClient

    tracker = Tracker(
        "exp", "r", tracking_uri=shared_db, fallback_dir=tmp_path, system_metrics=False
    )
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with tracker:
            tracker.log_metrics({"loss": 0.5}, step=1)
            if raised:
                raise raised()
    assert exit_status(raised) == status
    assert MlflowClient(shared_db).get_run(tracker.run_id).info.status == status
    assert _history(shared_db, tracker.run_id, "loss") == [(1, 0.5)]
    with NullTracker() as null:  # the twin takes part, doing nothing
        assert null.run_id is None


def test_sigterm_in_the_block_raises_exit_143_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        with sigterm_as_exit():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler interrupts this
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_stop_signal_during_the_close_waits_for_it(shared_db, tmp_path, monkeypatch):
    """Ctrl-C, then the launcher's SIGTERM while the tracker closes: the close finishes."""
    from mlflow import MlflowClient

    tracker = Tracker("exp", "r", tracking_uri=shared_db, fallback_dir=tmp_path,
                      system_metrics=False)  # fmt: skip
    real_close = tracker.close

    def close_under_sigterm(status: str = "FINISHED") -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here
        real_close(status)

    monkeypatch.setattr(tracker, "close", close_under_sigterm)
    with pytest.raises(SystemExit) as stopped:
        with sigterm_as_exit(), tracker:
            tracker.log_metrics({"loss": 0.5}, step=1)
            raise KeyboardInterrupt
    assert stopped.value.code == 143  # the held SIGTERM, once the close is done
    assert MlflowClient(shared_db).get_run(tracker.run_id).info.status == "KILLED"
    assert _history(shared_db, tracker.run_id, "loss") == [(1, 0.5)]


def test_unclosed_tracker_falls_back_at_interpreter_exit(tmp_path):
    script = f"""
from cage_ds.train.tracking import Tracker
t = Tracker("exp", "crashed", tracking_uri={_closed_port_uri()!r}, fallback_dir={str(tmp_path)!r},
            system_metrics=False, close_timeout_s=0)
for step in range(5):
    t.log_metrics({{"loss": step / 7}}, step=step)
raise SystemExit("training crashed")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "not closed before exit" in result.stderr
    (path,) = tmp_path.glob("crashed-*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["status"] == "FAILED"
    assert [(r["step"], r["value"]) for r in records[1:]] == [(s, s / 7) for s in range(5)]


def test_log_to_run_is_best_effort(tmp_path, caplog):
    from cage_ds.train.tracking import log_to_run

    file = tmp_path / "a.txt"
    file.write_text("x")
    uri = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert log_to_run("no-such-experiment", "r", file, tracking_uri=uri) is None
    assert "no run 'r' in experiment 'no-such-experiment'" in caplog.text
    assert log_to_run("e", "r", file, tracking_uri="bogus://nowhere") is None
    assert "could not log" in caplog.text
