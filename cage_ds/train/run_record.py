"""One MLflow run per training run, across crashes: the recorded run id and the local record
of what a resumed run continues.

- ``<run_dir>/mlflow_run.json`` holds ``{"run_id", "tracking_uri", "experiment"}``, written
  atomically (temp file, fsync, rename) by the tracker as soon as it creates or continues a run.
- A run resumed from a checkpoint at step ``s`` continues the recorded run (same URI and
  experiment) with a ``Continuation``: the points of steps <= ``s`` of its lineage read back
  from metrics.jsonl (the records since the last start at step 0; the last value of a
  (key, step) wins). The tracker sends those the server lacks; a continued run holds one point
  per (key, step).
- Fallback files of the continued run (or of a segment that never reached the server) hold a
  subset of those points: they are renamed ``*.jsonl.recovered`` so that no replay sends them
  twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .diskio import disk_full_guard

logger = logging.getLogger(__name__)

RUN_RECORD = "mlflow_run.json"
"""The recorded MLflow run of a run, under its run_dir."""

Point = tuple[str, float, int]
"""(key, value, step) of one metric point."""


@dataclass(frozen=True)
class Continuation:
    """What a resumed run hands its tracker: the run to continue (None: none recorded, a new
    run) and the local record of steps ``1..through_step``."""

    run_id: str | None
    points: tuple[Point, ...]
    through_step: int


def write_run_record(path: Path, run_id: str, tracking_uri: str, experiment: str) -> None:
    """Record ``run_id`` at ``path`` atomically (a reader sees the old record or the new one)."""
    record = {"run_id": run_id, "tracking_uri": tracking_uri, "experiment": experiment}
    tmp = path.with_name(path.name + ".tmp")
    with disk_full_guard(path):
        with open(tmp, "w") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def read_run_id(path: Path, tracking_uri: str, experiment: str) -> str | None:
    """The run id recorded at ``path`` for this URI and experiment; None (with a warning when
    the record names another server or experiment) otherwise."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        run_id = record["run_id"]
    except (ValueError, KeyError, TypeError):
        logger.warning("MLflow run record %s is unreadable: the resumed run gets a new run", path)
        return None
    if (record.get("tracking_uri"), record.get("experiment")) != (tracking_uri, experiment):
        logger.warning(
            "MLflow run record %s is for experiment %r at %s, this run tracks to %r at %s: "
            "the resumed run gets a new run",
            path,
            record.get("experiment"),
            record.get("tracking_uri"),
            experiment,
            tracking_uri,
        )
        return None
    return run_id


def lineage_points(metrics_log: Path, through_step: int) -> tuple[Point, ...]:
    """The metric points of steps <= ``through_step`` in ``metrics_log`` since its last start
    at step 0 (one per (key, step), the last written wins); empty when the file is absent."""
    if not metrics_log.is_file():
        return ()
    latest: dict[tuple[str, int], float] = {}
    for line in metrics_log.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("event") == "start":
            if record.get("step") == 0:
                latest.clear()
            continue
        step = record.get("step")
        if not isinstance(step, int) or step > through_step:
            continue
        for key, value in record.items():
            if key != "step":
                latest[(key, step)] = value
    return tuple((key, float(value), step) for (key, step), value in latest.items())


def retire_fallbacks(fallback_dir: Path, run_id: str | None) -> list[Path]:
    """Rename the fallback files of ``run_id`` (and of segments that never reached a server)
    to ``*.jsonl.recovered``: their metric points are in the resumed run's local record.
    Returns the new paths."""
    retired = []
    for path in sorted(fallback_dir.glob("*.jsonl")) if fallback_dir.is_dir() else []:
        try:
            header = json.loads(path.read_text().partition("\n")[0])
        except ValueError:
            continue
        if header.get("kind") == "run" and header.get("run_id") in (run_id, None):
            target = path.with_name(path.name + ".recovered")
            os.replace(path, target)
            retired.append(target)
    return retired


def step_ranges(steps: Iterable[int]) -> str:
    """Sorted steps as ranges: ``[3, 4, 5, 9] -> "3-5, 9"``."""
    parts: list[str] = []
    ordered = sorted(set(steps))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(parts)
