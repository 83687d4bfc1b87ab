"""The README's example scripts run as shown: launch/examples/hf_trainer_cage.py and
launch/examples/accelerate_cage.py on 2 CPU ranks (torchrun, gloo), 3 steps, ZeRO-3; each
prints its last log with a finite loss and the CAGE telemetry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from testkit import torchrun

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["hf_trainer_cage.py", "accelerate_cage.py"])
def test_example_runs_on_two_cpu_ranks(tmp_path, script):
    args = [str(Path(ROOT) / "launch" / "examples" / script), "--steps", "3", "--stage", "3"]
    if script.startswith("hf_trainer"):
        args += ["--out", str(tmp_path / "out")]
    proc = torchrun(2, *args, env={"PYTHONWARNINGS": "ignore"}, cwd=tmp_path, timeout=600)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert math.isfinite(last["loss"]) and 0 < last["quant/rel_error"] < 1, last
    assert "train/lambda" in last, last
