"""Bad input through the launch scripts with the real cage-train pre-flight (no probe): a
missing dataset, an unknown key (override or file), a malformed override or config file, a
tokenizer vocabulary larger than the model's embedding and a global batch not divisible by
the world size each exit 2 with the config error and the launcher's "nothing was started",
before any launcher or worker runs (no DeepSpeed/torchrun output, no run folder)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from testkit import child_env

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "configs/experiments/cage_w4a4.yaml"

# id: (script, env, world size, extra args, config file text or None, expected message)
CASES = {
    "missing-dataset": (
        "cpu_single_node.sh", {"NPROC": "2"}, 2, ["data.source=/missing/corpus"], None,
        "data.source='/missing/corpus': no such file, folder or glob match",
    ),
    "unknown-override-key": (
        "cpu_torchrun.sh", {"NNODES": "1", "NPROC_PER_NODE": "2"}, 2, ["optim.lamda=3"], None,
        "unknown key 'optim.lamda'; did you mean 'optim.cage_lambda'",
    ),
    "malformed-override": (
        "cpu_per_node_no_ssh.sh", {"NNODES": "2"}, 2, ["train.steps"], None,
        "malformed override 'train.steps': expected section.field=value",
    ),
    "unknown-key-in-file": (
        "cpu_slurm_local.sh", {"NNODES": "2"}, 2, [], "extends: {base}\ntrain:\n  stepz: 3\n",
        "unknown key 'train.stepz'; did you mean 'train.steps'",
    ),
    "malformed-file": (
        "cpu_multi_node_pdsh.sh", {"NPROC": "2"}, 2, [], "train: [steps: 3\n",
        "is not valid YAML/JSON",
    ),
    "tokenizer-vocab-exceeds-embedding": (
        "single_node.sh", {"NUM_GPUS": "2"}, 2, ["data.bpe_vocab_size=8192"], None,
        "tokenizer vocabulary 8192 (data.tokenizer='bpe') is larger than the model's "
        "vocab_size=4096",
    ),
    "batch-not-divisible-by-world": (
        "cpu_single_node.sh", {"NPROC": "3"}, 3, [], None,
        "train.global_batch_size=16 is not divisible by train.micro_batch_size=8 x world size 3",
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_before_any_worker(case, tmp_path):
    script, env, world, extra, config_text, message = CASES[case]
    config = EXPERIMENT
    if config_text is not None:
        config = str(tmp_path / "bad.yaml")
        Path(config).write_text(config_text.format(base=ROOT / EXPERIMENT))
    out = tmp_path / "runs"
    args = ["--config", config, f"train.output_dir={out}", "train.run_name=bad", *extra]
    full_env = {**child_env(), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **env}
    full_env.pop("CAGE_SKIP_CHECK", None)
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / script), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    err = result.stderr
    assert "cage-train: config error:" in err and message in err, err
    assert err.rstrip().endswith(
        f"launch: config check failed for world size {world}; nothing was started"
    ), err
    for launcher_trace in ("runner.py", "launch.py", "torch.distributed.run", "spawned"):
        assert launcher_trace not in result.stdout + err, launcher_trace
    assert not out.exists()


# id: (script, env, expected message); each exits before any Python runs
ZERO_RANKS = {
    "cpu_single_node-NPROC=0": ("cpu_single_node.sh", {"NPROC": "0"}, "NPROC"),
    "single_node-NUM_GPUS=0": ("single_node.sh", {"NUM_GPUS": "0"}, "NUM_GPUS"),
    "cpu_torchrun-NPROC_PER_NODE=0": (
        "cpu_torchrun.sh", {"NNODES": "1", "NPROC_PER_NODE": "0"}, "NPROC_PER_NODE"),
    "cpu_slurm_local-NNODES=0": ("cpu_slurm_local.sh", {"NNODES": "0"}, "NNODES"),
    "cpu_multi_node_pdsh-NPROC=0": ("cpu_multi_node_pdsh.sh", {"NPROC": "0"}, "NPROC"),
    "cpu_per_node_no_ssh-NPROC_PER_NODE=x": (
        "cpu_per_node_no_ssh.sh", {"NPROC_PER_NODE": "x"}, "NPROC_PER_NODE"),
    "multi_node_pdsh-zero-slots": (
        "multi_node_pdsh.sh", {"HOSTFILE": "{hostfile}"}, "world size"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ZERO_RANKS))
def test_zero_ranks_stop_the_launcher(case, tmp_path):
    """A rank or node count below 1 (or not a number) is refused by name, even with
    CAGE_SKIP_CHECK=1, before the pre-flight or any launcher runs."""
    script, env, name = ZERO_RANKS[case]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=0\n")
    env = {k: v.format(hostfile=hostfile) for k, v in env.items()}
    full_env = {**child_env(), "CAGE_SKIP_CHECK": "1", "MASTER_ADDR": "127.0.0.1", **env}
    out = tmp_path / "runs"
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / script), "--config", EXPERIMENT,
         f"train.output_dir={out}"],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    value = "0" if name == "world size" else env[name]
    assert result.stderr.strip() == (
        f"launch: {name} must be an integer >= 1, got '{value}'; nothing was started"
    ), result.stderr
    assert not out.exists()
