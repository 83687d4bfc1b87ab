"""MLflow tracking during a cage-train run: the rank-0 ``Tracker``, its ``NullTracker`` twin,
and the outage-proof delivery buffer behind them (the fallback file's format:
cage_ds.train.fallback; its replay: cage_ds.train.replay).

Notable choices:
- Every public call only appends to an in-memory buffer (metrics keep their step and
  wall-clock timestamp); a daemon thread delivers batches to MLflow every
  ``flush_interval_s``. Training never waits on the network.
- Outage: a failed delivery warns once per outage (``logging``), keeps everything buffered and
  retries with exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``). HTTP calls
  fail fast: ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` default to
  ``http_timeout_s`` / 0 here unless the user set them (our own backoff does the retrying).
  Re-sent batches are idempotent: params are immutable and MLflow keeps one row per
  (key, step, timestamp, value) metric.
- ``close()`` flushes for up to ``close_timeout_s``; whatever is still undelivered is written to
  a fallback file (``fallback_dir``, default ``./mlflow-fallback``), named in the log, and
  ``python -m cage_ds.train.replay FILE`` brings it into the server later.
- Every exit closes the run: ``with tracker:`` closes it as ``exit_status`` of the exception
  (FINISHED, KILLED for an interrupt or SIGTERM, FAILED for an error); a tracker never closed
  is closed as FAILED at interpreter exit (atexit); only a hard kill loses the buffer (the
  points stay in the run's metrics.jsonl, which a resume sends again).
- System metrics use MLflow's own ``SystemMetricsMonitor`` (psutil; offline is fine). They are
  best effort: samples taken during an outage are dropped by MLflow's monitor, not buffered.
- Artifacts are logged by path: the file must still exist when it is delivered (or at close).
- Crashes (cage_ds.train.run_record): the run id is recorded in ``run_record`` once the run
  exists; a ``continuation`` continues the recorded run (status back to RUNNING) and queues
  the local record of the steps before the resume. A continued run holds one point per
  (key, step): points the server already has are not sent again; steps with no point on the
  server nor in the local record are a warning naming them.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .diskio import disk_full_guard
from .fallback import write_fallback
from .run_record import Continuation, step_ranges, write_run_record
from .signals import stop_signals_held

logger = logging.getLogger(__name__)

# MLflow limits (mlflow.utils.validation): values, keys, entities per log_batch request.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_KEY_FORBIDDEN = re.compile(r"[^\w\-./ :]")
_TRUNCATION_MARK = "...[truncated]"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (artifacts: ./mlruns)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sanitize_key(key: str) -> str:
    """An MLflow-valid key: forbidden characters become ``_``; a key over 250 characters keeps
    its first 241 characters plus ``~`` and an 8-hex digest of the whole key (still unique)."""
    key = _KEY_FORBIDDEN.sub("_", str(key))
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_LENGTH - 9]}~{digest}"
    return key


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": str(value)}``; lists/tuples become JSON text.

    Values longer than MLflow's 6000-character limit are cut and end in ``...[truncated]``
    (log the full config as an artifact). Keys are passed through ``sanitize_key``.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
        flat[sanitize_key(name)] = text
    return flat


@dataclass
class _Buffer:
    """Everything not yet delivered. Callers append at the tail; only the delivery side
    removes from the head (under the tracker's lock)."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # (key, value, timestamp_ms, step)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    # (local path, artifact dir in the run)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.params or self.tags or self.metrics or self.artifacts)


def exit_status(error: type[BaseException] | None) -> str:
    """The MLflow status of a run that ends with ``error`` raised: FINISHED without one,
    KILLED when stopped from outside (KeyboardInterrupt, SystemExit: cage_ds.train.signals
    turns SIGTERM into one), FAILED for any other exception."""
    if error is None:
        return "FINISHED"
    return "KILLED" if issubclass(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


class _ClosesOnExit:
    """``with tracker: ...`` closes the tracker as ``exit_status`` of the block's exception
    (the exception still propagates); a SIGINT/SIGTERM during the close takes effect after it."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        error: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with stop_signals_held():  # a second stop signal must not cut the close short
            self.close(exit_status(error))


class NullTracker(_ClosesOnExit):
    """The no-op twin of ``Tracker`` for ranks != 0 and for tracking disabled."""

    run_id: str | None = None
    fallback_path: Path | None = None

    def log_params(self, config: Mapping[str, Any]) -> None:
        """No-op."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """No-op."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """No-op."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """No-op."""

    def close(self, status: str = "FINISHED") -> None:
        """No-op."""


class Tracker(_ClosesOnExit):
    """Rank-0 MLflow tracker that never stops training and loses nothing.

    Example::

        tracker = Tracker("cage-w4a4", run_name="tiny-zero3")
        tracker.log_params(resolved_config)          # nested dict, flattened to "a.b.c"
        tracker.log_metrics({"train/loss": 3.2, "train/lr": 1e-3}, step=10)
        tracker.log_artifact("out/loss_curve.png")
        tracker.close("FINISHED")                     # flush, else write the fallback file

    or ``with Tracker(...) as tracker:`` to close it on every exit (``exit_status``).

    ``tracking_uri`` defaults to ``default_tracking_uri()``; ``fallback_dir`` receives the
    undelivered data at close (default ``./mlflow-fallback``); deliveries run every
    ``flush_interval_s``, after a failure every ``backoff_s * 2**k`` up to ``max_backoff_s``;
    ``close`` keeps trying for ``close_timeout_s``; ``http_timeout_s`` bounds one request.
    ``run_record`` receives the run id once the run exists; ``continuation`` continues a
    recorded run after a crash (module docstring).
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        *,
        tracking_uri: str | None = None,
        fallback_dir: str | os.PathLike | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        flush_interval_s: float = 2.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        close_timeout_s: float = 15.0,
        http_timeout_s: int = 10,
        run_record: str | os.PathLike | None = None,
        continuation: Continuation | None = None,
    ) -> None:
        if not experiment:
            raise ValueError("Tracker: experiment name must be a non-empty string")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(http_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.fallback_dir = Path(fallback_dir) if fallback_dir else Path.cwd() / "mlflow-fallback"
        self.run_id: str | None = None
        self.fallback_path: Path | None = None
        self._client = MlflowClient(self.tracking_uri)
        self._system_metrics = system_metrics
        self._system_metrics_interval_s = system_metrics_interval_s
        self._monitor: Any = None
        self._flush_interval_s = flush_interval_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._close_timeout_s = close_timeout_s
        self._buffer = _Buffer()
        self._logged_params: dict[str, str] = {}
        self._run_record = Path(run_record) if run_record else None
        self._continuation = continuation
        # (key, step) a continued run holds or has queued: later points there are dropped
        self._held: set[tuple[str, int]] | None = None
        self._held_params: dict[str, str] = {}
        if continuation is not None:
            now = int(time.time() * 1000)
            self._buffer.metrics = [(k, v, now, s) for k, v, s in continuation.points]
            self._held = {(k, s) for k, _, s in continuation.points}
        self._lock = threading.Lock()
        self._deliver_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self._next_try = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._deliver_loop, name="cage-mlflow", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    # ---- public API (cheap: buffer and return) ----
    def log_params(self, config: Mapping[str, Any]) -> None:
        """Log a (nested) config as flattened params. Re-logging a key with another value is
        an error, since MLflow params are immutable."""
        self._check_open()
        flat = flatten_params(config)
        truncated = [k for k, v in flat.items() if v.endswith(_TRUNCATION_MARK)]
        if truncated:
            logger.warning(
                "MLflow params cut to %d characters: %s",
                MAX_PARAM_VALUE_LENGTH,
                ", ".join(truncated),
            )
        with self._lock:
            for key, value in flat.items():
                old = self._logged_params.get(key)
                if old is not None and old != value:
                    raise ValueError(
                        f"MLflow param {key!r} already logged as {old!r}; "
                        f"params are immutable, cannot change it to {value!r}"
                    )
            self._logged_params.update(flat)
            self._buffer.params.update(flat)
        self._wake.set()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step`` with the current wall-clock time (ms)."""
        if int(step) != step or step < 0:
            raise ValueError(f"log_metrics: step must be a non-negative integer, got {step!r}")
        ts = int(time.time() * 1000)
        rows = [(sanitize_key(k), float(v), ts, int(step)) for k, v in metrics.items()]
        self._check_open()
        with self._lock:
            if self._held is not None:
                rows = [r for r in rows if (r[0], r[3]) not in self._held]
                self._held.update((r[0], r[3]) for r in rows)
            self._buffer.metrics.extend(rows)
            big = len(self._buffer.metrics) >= MAX_METRICS_PER_BATCH
        if big:
            self._wake.set()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory (it must still exist when delivered)."""
        self._check_open()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: no such file or directory: {path}")
        with self._lock:
            self._buffer.artifacts.append((str(path.resolve()), artifact_path))
        self._wake.set()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values become strings)."""
        self._check_open()
        with self._lock:
            self._buffer.tags.update({sanitize_key(k): str(v) for k, v in tags.items()})
        self._wake.set()

    def close(self, status: str = "FINISHED") -> None:
        """Stop the delivery thread, flush for up to ``close_timeout_s``, then terminate the run
        with ``status``; if anything is undelivered, write it to the fallback file."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        self._stop.set()
        self._wake.set()
        self._thread.join()
        deadline = time.monotonic() + self._close_timeout_s
        delivered = self._deliver()
        while not delivered and time.monotonic() < deadline:
            time.sleep(min(self._current_backoff(), max(0.0, deadline - time.monotonic())))
            delivered = self._deliver()
        self._stop_system_metrics()
        if delivered:
            try:
                self._client.set_terminated(self.run_id, status=status)
                return
            except Exception as err:
                logger.warning("MLflow: could not set run %s to %s: %s", self.run_id, status, err)
        with disk_full_guard(self.fallback_dir):
            self.fallback_path = self._write_fallback(status)
        logger.warning(
            "MLflow at %s unreachable at close: undelivered tracking data written to %s; "
            "replay it with: python -m cage_ds.train.replay %s [--tracking-uri URI]",
            self.tracking_uri,
            self.fallback_path,
            self.fallback_path,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Tracker for run {self.run_name!r} is closed")

    def _close_at_exit(self) -> None:
        """Interpreter exit without close() (e.g. training raised): flush or fall back."""
        logger.warning(
            "Tracker for run %r not closed before exit: closing it as FAILED", self.run_name
        )
        self.close("FAILED")

    # ---- delivery ----
    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            if not self._stop.is_set() and time.monotonic() >= self._next_try:
                self._deliver()

    def _current_backoff(self) -> float:
        return min(self._max_backoff_s, self._backoff_s * 2 ** max(0, self._failures - 1))

    def _deliver(self) -> bool:
        """One delivery attempt of everything buffered; True when the buffer is empty after it."""
        with self._deliver_lock:
            try:
                self._ensure_run()
                self._send_params_and_tags()
                self._send_metrics()
                self._send_artifacts()
            except Exception as err:
                self._failures += 1
                self._next_try = time.monotonic() + self._current_backoff()
                if self._failures == 1:
                    with self._lock:
                        n = len(self._buffer.metrics)
                    logger.warning(
                        "MLflow at %s unreachable (%s: %s); training continues, %d metric points "
                        "buffered, retrying with backoff",
                        self.tracking_uri,
                        type(err).__name__,
                        str(err).splitlines()[0][:200],
                        n,
                    )
                return False
            if self._failures:
                logger.warning(
                    "MLflow at %s reachable again after %d failed deliveries; "
                    "buffered data delivered",
                    self.tracking_uri,
                    self._failures,
                )
            self._failures = 0
            with self._lock:
                return self._buffer.empty()

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        run = self._continued_run()
        if run is None:
            experiment_id = get_or_create_experiment(self._client, self.experiment)
            run = self._client.create_run(experiment_id, run_name=self.run_name)
        if self._continuation is not None:  # before run_id: a failure here is retried whole
            self._hold(run)
        self.run_id = run.info.run_id
        logger.info(
            "MLflow run %s (%s) in experiment %r at %s",
            self.run_id,
            run.info.run_name,
            self.experiment,
            self.tracking_uri,
        )
        if self._run_record is not None:
            try:
                write_run_record(self._run_record, self.run_id, self.tracking_uri, self.experiment)
            except OSError as err:
                logger.warning("MLflow run id not recorded in %s: %s", self._run_record, err)
        if self._system_metrics:
            self._start_system_metrics()

    def _continued_run(self) -> Any:
        """The recorded run of the continuation, set RUNNING again; None when there is none
        (or the server does not know it: a new run, with a warning)."""
        from mlflow.exceptions import MlflowException

        run_id = self._continuation.run_id if self._continuation else None
        if run_id is None:
            return None
        try:
            run = self._client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning(
                "MLflow run %s (recorded) not found at %s: the resumed run gets a new run",
                run_id,
                self.tracking_uri,
            )
            return None
        self._client.update_run(run_id, status="RUNNING")
        return run

    def _hold(self, run: Any) -> None:
        """Drop the buffered points ``run`` already holds on the server, hold its params, and
        warn about steps 1..through_step with no point anywhere."""
        on_server = held_points(self._client, run)
        with self._lock:
            self._buffer.metrics = [
                r for r in self._buffer.metrics if (r[0], r[3]) not in on_server
            ]
            self._held |= on_server
            covered = {step for _, step in self._held}
        self._held_params = dict(run.data.params)
        missing = set(range(1, self._continuation.through_step + 1)) - covered
        if missing:
            logger.warning(
                "MLflow run %s: steps %s have no metric point on the server nor in the local "
                "record (metrics.jsonl); the run has a gap there",
                run.info.run_id,
                step_ranges(missing),
            )

    def _send_params_and_tags(self) -> None:
        from mlflow.entities import Param, RunTag

        with self._lock:
            params = dict(self._buffer.params)
            tags = dict(self._buffer.tags)
        changed = [k for k, v in params.items() if self._held_params.get(k, v) != v]
        if changed:
            logger.warning(
                "MLflow run %s keeps its params %s (immutable); the resumed run's values differ",
                self.run_id,
                ", ".join(changed),
            )
        items = [Param(k, v) for k, v in params.items() if k not in self._held_params]
        log_in_batches(self._client, self.run_id, params=items)
        log_in_batches(self._client, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        with self._lock:
            for k in params:
                self._buffer.params.pop(k, None)
            for k, v in tags.items():
                if self._buffer.tags.get(k) == v:
                    del self._buffer.tags[k]

    def _send_metrics(self) -> None:
        from mlflow.entities import Metric

        while True:
            with self._lock:
                chunk = self._buffer.metrics[:MAX_METRICS_PER_BATCH]
            if not chunk:
                return
            self._client.log_batch(self.run_id, metrics=[Metric(*row) for row in chunk])
            with self._lock:
                del self._buffer.metrics[: len(chunk)]

    def _send_artifacts(self) -> None:
        while True:
            with self._lock:
                if not self._buffer.artifacts:
                    return
                path, artifact_path = self._buffer.artifacts[0]
            if not Path(path).exists():
                logger.error("MLflow artifact %s vanished before delivery; skipped", path)
            elif Path(path).is_dir():
                self._client.log_artifacts(self.run_id, path, artifact_path)
            else:
                self._client.log_artifact(self.run_id, path, artifact_path)
            with self._lock:
                self._buffer.artifacts.pop(0)

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self._system_metrics_interval_s,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as err:  # psutil missing, platform without support, ...
            self._monitor = None
            logger.warning("MLflow system metrics skipped: %s", err)

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    # ---- fallback file (cage_ds.train.fallback) ----
    def _write_fallback(self, status: str) -> Path:
        """Move the undelivered buffer into a new fallback file under ``fallback_dir``."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        stem = f"{sanitize_key(self.run_name or 'run').replace('/', '_')}-{stamp}"
        with self._lock:
            buf, self._buffer = self._buffer, _Buffer()
        header = {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "run_name": self.run_name,
            "run_id": self.run_id or (self._continuation and self._continuation.run_id),
            "status": status,
        }
        return write_fallback(
            self.fallback_dir, stem, header, buf.params, buf.tags, buf.metrics, buf.artifacts
        )


def get_or_create_experiment(client: Any, name: str) -> str:
    """Experiment id for ``name``, creating it (tolerates a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as err:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise err
        return experiment.experiment_id


def held_points(client: Any, run: Any) -> set[tuple[str, int]]:
    """The (key, step) of every metric point ``run`` holds on the server."""
    return {
        (key, m.step)
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
    }


def log_in_batches(
    client: Any, run_id: str, *, params: Iterable = (), tags: Iterable = (), metrics: Iterable = ()
) -> None:
    """``client.log_batch`` calls within MLflow's per-request limits (params and tags apart)."""
    for name, items, size in (
        ("params", list(params), MAX_PARAMS_PER_BATCH),
        ("tags", list(tags), MAX_PARAMS_PER_BATCH),
        ("metrics", list(metrics), MAX_METRICS_PER_BATCH),
    ):
        for i in range(0, len(items), size):
            client.log_batch(run_id, **{name: items[i : i + size]})


def make_tracker(
    enabled: bool, rank: int, experiment: str, run_name: str | None = None, **kwargs: Any
) -> Tracker | NullTracker:
    """``Tracker(experiment, run_name, **kwargs)`` on rank 0 when enabled, else ``NullTracker``."""
    if enabled and rank == 0:
        return Tracker(experiment, run_name, **kwargs)
    return NullTracker()


def log_to_run(
    experiment: str,
    run_name: str,
    path: str | os.PathLike,
    artifact_path: str | None = None,
    tracking_uri: str | None = None,
) -> str | None:
    """Best effort: upload ``path`` (a file or folder) to the newest MLflow run named
    ``run_name`` in ``experiment``; returns its run id, or None with a warning when there is no
    such run or the server fails (never raises)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri or default_tracking_uri()
    try:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs(
                [found.experiment_id],
                filter_string=f"tags.mlflow.runName = '{run_name}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found is not None
            else []
        )
        if not runs:
            logger.warning(
                "MLflow: no run %r in experiment %r at %s; %s not logged",
                run_name,
                experiment,
                uri,
                path,
            )
            return None
        run_id = runs[0].info.run_id
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)
        return run_id
    except Exception as err:  # best effort: the caller's work is done either way
        logger.warning("MLflow: could not log %s to run %r at %s: %s", path, run_name, uri, err)
        return None
