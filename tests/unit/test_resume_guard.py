"""A resume compares the config with the checkpoint's: run-altering changes are refused by
name (old -> new) unless allowed, harmless ones pass, a checkpoint without a config warns."""

from __future__ import annotations

from pathlib import Path

import pytest

from cage_ds.train.config import CONFIGS_DIR, ConfigError, load_config
from cage_ds.train.resume_guard import check_config, checkpoint_root, config_changes

EXPERIMENT = CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"
CKPT = Path("runs/r/checkpoints/step000000004")


def saved_meta(*overrides: str) -> dict:
    return {"config": load_config(EXPERIMENT, list(overrides)).to_dict()}


def test_unchanged_and_harmless_changes_pass():
    meta = saved_meta("train.steps=10")
    free = ["train.steps=10", "tracking.enabled=true", "train.log_every=3", "train.eval_every=0",
            "train.progress=false", "checkpoint.every=7", "checkpoint.keep_last=5",
            "train.output_dir=/elsewhere", "data.val_max_blocks=4",
            "train.micro_batch_size=4"]  # fmt: skip
    assert check_config(load_config(EXPERIMENT, ["train.steps=10"]), meta, CKPT) == []
    assert check_config(load_config(EXPERIMENT, free), meta, CKPT) == []


@pytest.mark.parametrize(
    "override",
    ["optim.lr=0.01", "optim.cage_silence=0.5", "quant.preset=w3a3", "model.num_layers=3",
     "data.seq_len=64", "data.source=/tmp/other.txt", "train.steps=11",
     "train.tokens_per_param=10.5", "train.global_batch_size=32", "train.seed=1",
     "deepspeed.stage=2"],
)  # fmt: skip
def test_each_run_altering_key_is_a_change(override):
    key, _, value = override.partition("=")
    cfg = load_config(EXPERIMENT, ["train.steps=10", override])
    ((name, _, new),) = config_changes(saved_meta("train.steps=10")["config"], cfg)
    assert name == key and str(new) == value


def test_refusal_names_every_change_and_the_fix():
    cfg = load_config(EXPERIMENT, ["optim.cage_lambda=20.0", "optim.lr=1e-3"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg, saved_meta(), CKPT)
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint {CKPT} was written with: optim.lr: 0.003 -> 0.001, " in message
    assert "optim.cage_lambda: 10.0 -> 20.0; " in message
    assert message.endswith("set checkpoint.allow_config_change=true to resume with the new values")


def test_allowed_change_and_missing_config_are_announced():
    cfg = load_config(EXPERIMENT, ["optim.lr=1e-3", "checkpoint.allow_config_change=true"])
    (note,) = check_config(cfg, saved_meta(), CKPT)
    assert note == f"resuming {CKPT} with a changed config (allowed): optim.lr: 0.003 -> 0.001"
    (warning,) = check_config(cfg, None, CKPT)
    assert warning.startswith(f"warning: checkpoint {CKPT} holds no config")


def test_keys_the_checkpoint_lacks_are_not_compared():
    meta = saved_meta()
    del meta["config"]["optim"]["cage_min_tokens_per_param"]
    assert check_config(load_config(EXPERIMENT, []), meta, CKPT) == []


def test_checkpoint_root():
    assert checkpoint_root(load_config(EXPERIMENT, ["checkpoint.every=0"])) is None
    cfg = load_config(EXPERIMENT, ["checkpoint.every=2", "train.run_name=r"])
    assert checkpoint_root(cfg) == Path("runs/r/checkpoints")
    cfg = load_config(EXPERIMENT, ["checkpoint.dir=/c", "checkpoint.save_final=true"])
    assert checkpoint_root(cfg) == Path("/c")
