"""The tracker's fallback file: what a closed ``Tracker`` could not deliver, as JSON lines.

Line 1 is the header ``{"kind": "run", "tracking_uri", "experiment", "run_name", "run_id",
"status"}`` (``run_id`` None: the run never reached a server); then one record per param and
tag ``{"kind", "key", "value"}``, metric ``{"kind": "metric", "key", "value", "timestamp",
"step"}`` and artifact ``{"kind": "artifact", "path", "artifact_path"}`` (``path`` relative to
the file's folder: artifacts are copied to ``<stem>-artifacts/<i>/`` next to it). The file
appears whole or not at all (temp file, fsync, rename). ``cage_ds.train.replay`` delivers it;
``cage_ds.train.run_record.retire_fallbacks`` retires it when a resume recovers its points.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MetricRow = tuple[str, float, int, int]
"""(key, value, timestamp_ms, step) of one metric point."""


def write_fallback(
    directory: Path,
    stem: str,
    header: Mapping[str, Any],
    params: Mapping[str, str],
    tags: Mapping[str, str],
    metrics: Sequence[MetricRow],
    artifacts: Sequence[tuple[str, str | None]],
) -> Path:
    """Write ``<directory>/<stem>.jsonl`` (module docstring); ``artifacts`` are (local path,
    artifact dir in the run), copied next to it (a vanished one is skipped with an error)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.jsonl"
    records: list[dict[str, Any]] = [{"kind": "run", **header}]
    records += [{"kind": "param", "key": k, "value": v} for k, v in params.items()]
    records += [{"kind": "tag", "key": k, "value": v} for k, v in tags.items()]
    records += [
        {"kind": "metric", "key": k, "value": v, "timestamp": ts, "step": s}
        for k, v, ts, s in metrics
    ]
    for i, (src, artifact_path) in enumerate(artifacts):
        src_path = Path(src)
        if not src_path.exists():
            logger.error("MLflow artifact %s vanished before close; not saved", src)
            continue
        dest = directory / f"{stem}-artifacts" / str(i) / src_path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src_path.is_dir():
            shutil.copytree(src_path, dest)
        else:
            shutil.copy2(src_path, dest)
        records.append(
            {
                "kind": "artifact",
                "path": str(dest.relative_to(directory)),
                "artifact_path": artifact_path,
            }
        )
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_fallback(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records after it) of a fallback file; ValueError when it has no header."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records or records[0].get("kind") != "run":
        raise ValueError(f"{path}: not a cage_ds tracking fallback file (no 'run' header line)")
    return records[0], records[1:]
