"""The top-level config key ``backend`` (deepspeed | fsdp2): parsing, round trip, the rule
that backend=fsdp2 takes the deepspeed section only at its defaults, and the resume guard
treating a backend change (also from a checkpoint written before the key) as run-altering."""

from __future__ import annotations

import pytest
import yaml

from cage_ds.train.config import CONFIGS_DIR, ConfigError, load_config
from cage_ds.train.preflight import validate
from cage_ds.train.resume_guard import check_config, config_changes

EXPERIMENT = CONFIGS_DIR / "experiments" / "cage_w4a4.yaml"


def test_backend_default_override_and_file_round_trip(tmp_path):
    assert load_config(EXPERIMENT).backend == "deepspeed"
    cfg = load_config(EXPERIMENT, ["backend=fsdp2", "train.steps=7"])
    assert cfg.backend == "fsdp2" and cfg.train.steps == 7
    assert cfg.to_dict()["backend"] == "fsdp2"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    (tmp_path / "d.yaml").write_text("extends: " + str(EXPERIMENT) + "\nbackend: fsdp2\n")
    assert load_config(tmp_path / "d.yaml").backend == "fsdp2"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["backend=megatron"], "backend must be one of ['deepspeed', 'fsdp2'], got 'megatron'"),
        (["backend.stage=1"], "backend must be one of ['deepspeed', 'fsdp2'], got {'stage': 1}"),
        (["backnd=fsdp2"], "malformed override 'backnd=fsdp2'"),
    ],
)
def test_backend_bad_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(EXPERIMENT, override)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["deepspeed.stage=2"], "deepspeed.stage=2 does not apply to backend=fsdp2"),
        (["deepspeed.config=x.json"], "deepspeed.config='x.json' does not apply to backend=fsdp2"),
        (["quant.preset=fp"], "backend=fsdp2 needs quantized weights, got quant.preset='fp'"),
        (["quant.preset=w16a4"], "needs quantized weights, got quant.preset='w16a4'"),
    ],
)
def test_fsdp2_refuses_what_it_would_ignore(override, message):
    cfg = load_config(EXPERIMENT, ["backend=fsdp2", *override])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 2)
    assert message in str(err.value)


def test_fsdp2_accepts_rtn_cage_that_zero_refuses():
    rtn = ["quant.method=rtn"]
    validate(load_config(EXPERIMENT, ["backend=fsdp2", *rtn]), 2)
    with pytest.raises(ConfigError, match="under ZeRO stage 3"):
        validate(load_config(EXPERIMENT, rtn), 2)


def test_resume_guard_refuses_a_backend_change(tmp_path):
    ds, fsdp2 = load_config(EXPERIMENT), load_config(EXPERIMENT, ["backend=fsdp2"])
    assert config_changes(fsdp2.to_dict(), fsdp2) == []
    assert config_changes(ds.to_dict(), fsdp2) == [("backend", "deepspeed", "fsdp2")]
    old = {k: v for k, v in ds.to_dict().items() if k != "backend"}  # written before the key
    assert config_changes(old, fsdp2) == [("backend", "deepspeed", "fsdp2")]
    assert config_changes(old, ds) == []
    with pytest.raises(ConfigError, match="backend: 'deepspeed' -> 'fsdp2'"):
        check_config(fsdp2, {"config": ds.to_dict()}, tmp_path)
