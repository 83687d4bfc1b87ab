"""cage_ds.zero refuses DeepSpeed settings its hooks do not support, before any engine exists."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from cage_ds.zero import check_config, initialize
from cage_ds.zero.engine import check_parsed_zero_config


def _cfg(**zero) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **zero}}


@pytest.mark.parametrize(
    ("zero", "match"),
    [
        ({"zero_quantized_weights": True}, "zero_quantized_weights"),
        ({"zero_quantized_gradients": True}, "zero_quantized_gradients"),
        ({"zero_hpz_partition_size": 2}, "zero_hpz_partition_size"),
        ({"mics_shard_size": 2}, "mics_shard_size"),
        ({"offload_param": {"device": "nvme", "nvme_path": "/tmp"}}, "offload_param.device='nvme'"),
        ({"offload_param": {"device": "cpu"}}, "offload_param.device='cpu'"),
        ({"offload_optimizer": {"device": "cpu"}}, "offload_optimizer.device='cpu'"),
        ({"stage": 0}, "stage=0"),
    ],
)
def test_unsupported_zero_settings_are_refused(zero, match):
    with pytest.raises(ValueError, match=match):
        check_config(_cfg(**zero))
    if "mics_shard_size" in zero:  # MiCS is parsed outside DeepSpeedZeroConfig
        return
    # the same settings as DeepSpeed parsed them (what attach() checks on the engine)
    parsed = DeepSpeedZeroConfig(**{"stage": 3, **zero})
    with pytest.raises(ValueError, match=match.split("=")[0]):
        check_parsed_zero_config(parsed)


def test_supported_settings_pass():
    for stage in (1, 2, 3):
        check_config(_cfg(stage=stage, offload_param={"device": "none"}))
        check_parsed_zero_config(DeepSpeedZeroConfig(stage=stage, offload_param={"device": "none"}))


def test_config_file_is_read(tmp_path):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_cfg(zero_quantized_weights=True)))
    with pytest.raises(ValueError, match="ZeRO\\+\\+ qwZ"):
        check_config(str(path))


def test_initialize_needs_a_cage_optimizer():
    model = torch.nn.Linear(128, 4)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="CageAdamW"):
        initialize(model=model, optimizer=opt, config=_cfg())
