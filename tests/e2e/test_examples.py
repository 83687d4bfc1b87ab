"""The README's example scripts run as shown: launch/examples/hf_trainer_cage.py and
launch/examples/accelerate_cage.py on 2 CPU ranks (torchrun, gloo), 3 steps, ZeRO-3; each
prints its last log with a finite loss and the CAGE telemetry."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import child_env, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["hf_trainer_cage.py", "accelerate_cage.py"])
def test_example_runs_on_two_cpu_ranks(tmp_path, script):
    env = child_env()
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2",
           f"--master_port={free_port()}", str(Path(ROOT) / "launch" / "examples" / script),
           "--steps", "3", "--stage", "3"]  # fmt: skip
    if script.startswith("hf_trainer"):
        cmd += ["--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert math.isfinite(last["loss"]) and 0 < last["quant/rel_error"] < 1, last
    assert "train/lambda" in last, last
