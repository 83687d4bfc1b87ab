"""The launch/ scripts on CPU: usage headers; the pre-flight config check stops a bad launch
before any worker starts; every launch mode (DeepSpeed launcher, hostfile, 2 "nodes" with
--no_ssh, torchrun on 2 loopback nodes, the SLURM per-node step) starts the right ranks,
which all-reduce and see the right world size and arguments (a probe module stands in for
cage_ds.train via CAGE_TRAIN_MODULE); and one real cage-train run on 2 loopback nodes
(ZeRO-3) that tracks to MLflow and commits checkpoints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from testkit import child_env, free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name not in ("common.sh", "demo.sh"))

PROBE = '''
"""Stand-in for cage_ds.train: --check records the world size; a run all-reduces rank + 1."""
import json, os, sys
from pathlib import Path

out = Path(os.environ["PROBE_OUT"])
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
if "--check" in args:
    world = int(args[args.index("--world-size") + 1])
    (out / f"check-{os.getpid()}.json").write_text(json.dumps({"world": world, "argv": args}))
    sys.exit(int(os.environ.get("PROBE_CHECK_STATUS", "0")))
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps({
    "world": dist.get_world_size(), "sum": total.item(),
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "accelerator": os.environ.get("DS_ACCELERATOR"), "argv": args}))
dist.destroy_process_group()
'''


def _run(script: str, args: list[str], env: dict[str, str], timeout: float = 600):
    full_env = {**child_env(), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **env}
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "cage_launch_probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        "PYTHONPATH": str(tmp_path),
        "PROBE_OUT": str(out),
        "CAGE_TRAIN_MODULE": "cage_launch_probe",
    }
    return out, env


def test_every_script_opens_with_its_usage():
    assert len(SCRIPTS) >= 10, SCRIPTS
    for name in SCRIPTS:
        lines = (LAUNCH / name).read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash", name
        assert any(f"launch/{name}" in line for line in lines[1:6]), f"{name}: no usage line"
        shown = subprocess.run(
            ["bash", str(LAUNCH / name), "--help"], capture_output=True, text=True, timeout=30
        )
        assert shown.returncode == 0 and f"launch/{name}" in shown.stdout, (name, shown.stderr)
        assert "set -euo pipefail" not in shown.stdout, name
    bare = subprocess.run(
        ["bash", str(LAUNCH / "single_node.sh")], capture_output=True, text=True, timeout=30
    )
    assert bare.returncode == 2 and "launch/single_node.sh --config" in bare.stdout


def test_failed_config_check_starts_no_worker(probe):
    out, env = probe
    result = _run(
        "cpu_single_node.sh", ["--config", "bad.yaml"], {**env, "PROBE_CHECK_STATUS": "2"}
    )
    assert result.returncode == 2, result.stderr
    assert "config check failed for world size 2; nothing was started" in result.stderr
    assert not list(out.glob("rank*.json"))


LAUNCH_MODES = [
    # script, env, world size, local ranks
    ("cpu_single_node.sh", {"NPROC": "2"}, 2, [0, 1]),
    ("cpu_multi_node_pdsh.sh", {"NPROC": "2"}, 2, [0, 1]),
    ("cpu_per_node_no_ssh.sh", {"NNODES": "2", "NPROC_PER_NODE": "1"}, 2, [0, 0]),
    ("cpu_torchrun.sh", {"NNODES": "2", "NPROC_PER_NODE": "1"}, 2, [0, 0]),
    ("cpu_slurm_local.sh", {"NNODES": "2", "NPROC_PER_NODE": "1"}, 2, [0, 0]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "env", "world", "local_ranks"), LAUNCH_MODES, ids=[m[0] for m in LAUNCH_MODES]
)
def test_launch_mode_starts_all_ranks(probe, script, env, world, local_ranks):
    out, probe_env = probe
    args = ["--config", "configs/experiments/cage_w4a4.yaml", "train.steps=3"]
    result = _run(script, args, {**probe_env, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = [json.loads(p.read_text()) for p in out.glob("check-*.json")]
    assert checks == [{"world": world, "argv": ["--check", "--world-size", str(world), *args]}]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for info in ranks:
        assert info["world"] == world and info["sum"] == world * (world + 1) / 2
        assert info["argv"] == args and info["accelerator"] == "cpu"
    assert [info["local_rank"] for info in ranks] == local_ranks


@pytest.mark.slow
def test_real_cli_two_loopback_nodes_tracks_and_checkpoints(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--config",
        "configs/experiments/cage_w4a4.yaml",
        "train.steps=2",
        "train.eval_every=0",
        "train.log_every=1",
        "train.progress=false",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=launch-e2e",
        "tracking.enabled=true",
        f"tracking.tracking_uri={uri}",
        "tracking.system_metrics=false",
        "checkpoint.every=1",
        "checkpoint.keep_last=1",
    ]
    result = _run("cpu_per_node_no_ssh.sh", args, {"NNODES": "2", "NPROC_PER_NODE": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "launch-e2e" in result.stdout and "val_loss" in result.stdout

    checkpoints = tmp_path / "runs" / "launch-e2e" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step000000002"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step000000002"]
    manifest = json.loads((checkpoints / "step000000002" / "cage_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 2
    assert {"cage_rank_state_00000.pt", "cage_rank_state_00001.pt"} <= set(manifest["files"])

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cage_ds").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "launch-e2e"
    assert run.data.params["train.steps"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
