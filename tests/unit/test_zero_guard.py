"""The ZeRO state guard (cage_ds.zero.guard) on every row of its table, single process.

A weight is marked the way deepspeed==0.19.8 marks it (ZeRO-3: ``ds_id``; ZeRO-1/2 and
BF16_Optimizer: ``_hp_mapping``); tests/dist/test_zero_guards.py checks the same verdicts on
real DeepSpeed engines, so a DeepSpeed that stops setting these attributes fails there.
Also: the message CageAdamW gives for the flat 1-D partition ZeRO hands it without the hooks.
"""

from __future__ import annotations

import pytest
import torch

from cage_ds.nn import QuantLinear
from cage_ds.optim import CageAdamW
from cage_ds.quant import QuantConfig, Quantizer
from cage_ds.zero.guard import check_layer_state, zero_stage_of

MARKS = {0: {}, 1: {"_hp_mapping": None}, 3: {"ds_id": 7}}


def _layer(preset: str, method: str, stage: int, prequantized: bool, hooked: bool) -> QuantLinear:
    cfg = QuantConfig.preset(preset, method=method)
    layer = QuantLinear(
        128,
        8,
        weight_quantizer=None if cfg.weight is None else Quantizer(cfg.weight),
        act_quantizer=None if cfg.activation is None else Quantizer(cfg.activation),
    )
    for attr, value in MARKS[stage].items():
        setattr(layer.weight, attr, value)
    layer.weight_prequantized = prequantized
    layer.zero_hooked = hooked
    return layer


def test_guard_is_installed_on_import():
    assert QuantLinear.state_check is check_layer_state
    assert [zero_stage_of(_layer("w4a4", "quest", s, False, False).weight) for s in MARKS] == [
        0,
        1,
        3,
    ]


# (method, stage, prequantized, hooked) -> None (allowed) or the message fragment
CASES = [
    ("quest", 0, False, False, None),  # single process / stage 0 fake-quant
    ("quest", 0, True, False, None),  # load_quantized_state's reloaded model
    ("rtn", 0, False, False, None),
    ("quest", 1, True, True, None),  # cage_ds.zero
    ("quest", 3, True, True, None),
    ("rtn", 3, True, True, None),
    ("rtn", 1, False, False, None),  # cage-train's RTN-STE under plain deepspeed.initialize
    ("rtn", 3, False, False, None),
    ("quest", 1, False, True, "quantize it a second time"),
    ("quest", 3, False, True, "quantize it a second time"),
    ("quest", 1, True, False, "the gathered weight is the latent W"),
    ("quest", 3, True, False, "the gathered weight is the latent W"),
    ("rtn", 1, True, False, "the gathered weight is the latent W"),
    ("quest", 1, False, False, "QuEST-quantized weights under DeepSpeed ZeRO-1/2 without"),
    ("quest", 3, False, False, "QuEST-quantized weights under DeepSpeed ZeRO-3 without"),
]


@pytest.mark.parametrize(("method", "stage", "pre", "hooked", "match"), CASES)
def test_forward_guard(method, stage, pre, hooked, match):
    layer = _layer("w4a4", method, stage, pre, hooked)
    x = torch.randn(3, 128)
    if match is None:
        assert layer(x).shape == (3, 8)
        return
    with pytest.raises(RuntimeError, match=match) as err:
        layer(x)
    if not hooked:
        assert "cage_ds.zero.initialize" in str(err.value)


def test_layers_without_weight_quantizer_pass_under_zero():
    for stage in (1, 3):
        assert _layer("w16a4", "quest", stage, False, False)(torch.randn(2, 128)).shape == (2, 8)


def test_cage_adamw_names_a_flat_zero_partition():
    """What CageAdamW receives when DeepSpeed wraps it without cage_ds.zero: a 1-D flat
    partition in a quantized group (shape of the tiny Llama's ZeRO-2 partition, 2 ranks)."""
    flat = torch.nn.Parameter(torch.randn(655360))
    flat.grad = torch.randn_like(flat)
    spec = QuantConfig.preset("w4a4").weight
    quant = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    opt = CageAdamW([{"params": [flat], "quant": quant}], lr=1e-3, total_steps=10)
    with pytest.raises(ValueError, match="flat ZeRO partition") as err:
        opt.step()
    text = str(err.value)
    assert "(655360,)" in text and "cage_ds.zero.initialize" in text
    assert "cage_ds.zero.attach" in text
