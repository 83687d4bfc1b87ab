"""Deliver a tracker's fallback file (cage_ds.train.fallback) to an MLflow server.

    python -m cage_ds.train.replay run_dir/mlflow-fallback/*.jsonl [--tracking-uri URI]

Prints the run id each file landed in. A file lands in the run it names when the server has
that run, else in a new run of the recorded experiment and run name; it never lands in a
second run because the server failed (see ``replay``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .fallback import read_fallback
from .tracking import get_or_create_experiment, held_points, log_in_batches

logger = logging.getLogger(__name__)


def replay(path: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """Deliver the fallback file ``path`` and return the run id.

    Uses the recorded run when the target server has it, else (the server answers "does not
    exist") creates a run with the recorded experiment and run name (tagged
    ``cage_ds.replayed_from``); any other error (server unreachable, timeout) is raised, so a
    replay never lands in a second run. Params already present with the same value are
    skipped, and so are metric points at a (key, step) the run already holds (one point per
    (key, step)). The run ends with the recorded status.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    path = Path(path)
    header, records = read_fallback(path)
    uri = tracking_uri or header["tracking_uri"]
    client = MlflowClient(uri)
    run_id = header.get("run_id")
    existing_params: dict[str, str] = {}
    held: set[tuple[str, int]] = set()
    try:
        if run_id:
            run = client.get_run(run_id)
            existing_params = run.data.params
            held = held_points(client, run)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run_id = None
    if run_id is None:
        experiment_id = get_or_create_experiment(client, header["experiment"])
        run_id = client.create_run(
            experiment_id,
            run_name=header.get("run_name"),
            tags={"cage_ds.replayed_from": str(path)},
        ).info.run_id
    metrics = [
        Metric(r["key"], r["value"], r["timestamp"], r["step"])
        for r in records
        if r["kind"] == "metric" and (r["key"], r["step"]) not in held
    ]
    log_in_batches(
        client,
        run_id,
        params=[
            Param(r["key"], r["value"])
            for r in records
            if r["kind"] == "param" and existing_params.get(r["key"]) != r["value"]
        ],
        tags=[RunTag(r["key"], r["value"]) for r in records if r["kind"] == "tag"],
        metrics=metrics,
    )
    for r in records:
        if r["kind"] == "artifact":
            local = path.parent / r["path"]
            if local.is_dir():
                client.log_artifacts(run_id, str(local), r["artifact_path"])
            else:
                client.log_artifact(run_id, str(local), r["artifact_path"])
    client.set_terminated(run_id, status=header.get("status") or "FINISHED")
    logger.info("Replayed %s into run %s at %s (%d metric points)", path, run_id, uri, len(metrics))
    return run_id


def main(argv: Sequence[str] | None = None) -> None:
    """Replay each fallback file given, printing the run id it landed in."""
    parser = argparse.ArgumentParser(prog="python -m cage_ds.train.replay", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("paths", nargs="+", type=Path, help="fallback .jsonl files")
    parser.add_argument(
        "--tracking-uri", default=None, help="target server (default: the URI recorded in a file)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for path in args.paths:
        print(replay(path, args.tracking_uri))


if __name__ == "__main__":
    main()
