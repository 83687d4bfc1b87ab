"""Every exit of a training run closes its MLflow run (issue 14): a tiny single-process
cage-train run (sqlite MLflow) whose third step raises, or gets SIGTERM, has its MLflow run
FAILED or KILLED, not RUNNING, as soon as the entry point returns (not only at interpreter
exit), holding every step logged before it, value for value as in metrics.jsonl, and has
released the run dir lock. The failure is injected by patching Trainer.train_step in the run's
own process (DeepSpeed's groups do not survive a second in-process run, so each run gets a
process, forked by testkit.run_python).
"""

from __future__ import annotations

import json

import pytest
from test_cli_resume import cli_args
from testkit import cli_env, run_python

from cage_ds.train.signals import EXIT_STATUS

pytestmark = pytest.mark.slow

FAIL_AT = 3

DRIVER = """
import json, os, signal, sys
from cage_ds.train.cli import main
from cage_ds.train.loop import Trainer

real_step, steps = Trainer.train_step, []

def failing_step(self):
    steps.append(len(steps) + 1)
    if len(steps) == {fail_at}:
        {failure}
    return real_step(self)

Trainer.train_step = failing_step
try:
    sys.exit(main(sys.argv[1:]))
finally:  # the run's status when the entry point is left, before any atexit handler
    from pathlib import Path
    from mlflow import MlflowClient

    record = Path(os.environ["RUN_DIR"], "mlflow_run.json").read_text()
    run = MlflowClient(os.environ["MLFLOW_URI"]).get_run(json.loads(record)["run_id"])
    Path(os.environ["RUN_DIR"], "status_at_exit").write_text(run.info.status)
"""

FAILURES = {
    "error": ('raise RuntimeError("step failed (injected)")', "FAILED", 1),
    "sigterm": ("os.kill(os.getpid(), signal.SIGTERM)", "KILLED", EXIT_STATUS),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failing_step_closes_the_mlflow_run(tmp_path, cache, failure):
    from mlflow import MlflowClient

    code, status, rc = FAILURES[failure]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_args(tmp_path / "out", "deepspeed.stage=0", "data.val_max_blocks=2",
                    "checkpoint.every=0", "checkpoint.save_final=false", "tracking.enabled=true",
                    f"tracking.tracking_uri={uri}", "tracking.system_metrics=false")  # fmt: skip
    env = cli_env(cache, RUN_DIR=str(tmp_path / "out" / "r"), MLFLOW_URI=uri)
    proc = run_python("-c", DRIVER.format(fail_at=FAIL_AT, failure=code), *args, env=env,
                      timeout=300)  # fmt: skip
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-3000:]

    run_dir = tmp_path / "out" / "r"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    logged = {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}
    assert sorted(logged) == list(range(1, FAIL_AT))
    client = MlflowClient(uri)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert (run_dir / "status_at_exit").read_text() == status
    assert client.get_run(run_id).info.status == status
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert history == logged
    assert not list((run_dir / "mlflow-fallback").glob("*.jsonl"))  # all delivered
    assert (run_dir / "cage-train.lock").read_text() == ""  # released
