"""Refuse a QuantLinear whose mode contradicts how DeepSpeed ZeRO manages its weight.

Installed as ``QuantLinear.state_check`` when cage_ds is imported; every forward of a layer
with a weight quantizer calls ``check_layer_state``. With W the fp32 latent weight:

| weight managed by          | zero_hooked | weight_prequantized | forward computes     | verdict |
|----------------------------|-------------|---------------------|----------------------|---------|
| no ZeRO (plain / stage 0)  | -           | any                 | as configured        | ok      |
| ZeRO-1/2/3, CAGE hooks     | yes         | yes                 | q(W H), CAGE step    | ok      |
| ZeRO-1/2/3, CAGE hooks     | yes         | no                  | q(q(W H) H): twice   | refused |
| ZeRO-1/2/3, no hooks       | no          | yes                 | W taken as q(W H)    | refused |
| ZeRO-1/2/3, no hooks, QuEST| no          | no                  | q(W H), but no CAGE  | refused |
| ZeRO-1/2/3, no hooks, RTN  | no          | no                  | RTN-STE (cage-train) | ok      |

The QuEST fake-quant row computes a correct forward and STE, but its optimizer never gets
CAGE's view of the weights: a CageAdamW with quantized groups fails at its first step (flat
partitions), one without them silently trains without the correction, and every rank
quantizes whole gathered weights each forward. cage_ds.zero.initialize is exact there
(cage_lambda=0 gives plain QuEST). RTN under plain deepspeed.initialize, with lambda 0, is
how cage-train runs RTN-STE (cage_ds.train.loop.build_optimizer) and stays allowed.
"""

from __future__ import annotations

from torch import nn

from cage_ds.nn import QuantLinear

_FIX = (
    "build the engine with cage_ds.zero.initialize(model=..., optimizer=<CageAdamW>, config=...) "
    "(cage_lambda=0 for plain QuEST), or call cage_ds.zero.attach(engine, optimizer) right after "
    "deepspeed.initialize; with the Hugging Face Trainer use cage_ds.integrations.CageTrainer, "
    "with accelerate cage_ds.integrations.CageAccelerator"
)


def zero_stage_of(weight: nn.Parameter) -> int:
    """3 for a ZeRO-3 partitioned parameter, 1 for a ZeRO-1/2 (or BF16_Optimizer) lp
    parameter, 0 for a parameter DeepSpeed does not partition."""
    # pinned to deepspeed==0.19.8: ZeRO-3 tags params with ds_id (partition_parameters.Init);
    # DeepSpeedZeroOptimizer / BF16_Optimizer give every lp param _hp_mapping (link_hp_params)
    if hasattr(weight, "ds_id"):
        return 3
    if hasattr(weight, "_hp_mapping"):
        return 1
    return 0


def check_layer_state(layer: QuantLinear) -> None:
    """Raise RuntimeError naming the situation and the fix for a refused row of the table."""
    wq = layer.weight_quantizer
    if wq is None:
        return
    stage = zero_stage_of(layer.weight)
    if stage == 0:
        return
    where = f"QuantLinear({layer.in_features}, {layer.out_features}, weight={wq.spec.method})"
    zero = "ZeRO-3" if stage == 3 else "ZeRO-1/2"
    if layer.zero_hooked and not layer.weight_prequantized:
        raise RuntimeError(
            f"{where} runs under DeepSpeed {zero} with the CAGE hooks attached, but "
            "weight_prequantized was switched off: the gathered weight already is the quantized "
            "q(W H) and the fake-quant forward would quantize it a second time. Leave "
            "weight_prequantized as cage_ds.zero.attach sets it."
        )
    if layer.zero_hooked:
        return
    if layer.weight_prequantized:
        raise RuntimeError(
            f"{where} is in weight_prequantized mode under DeepSpeed {zero}, but the CAGE hooks "
            "are not attached: the gathered weight is the latent W, not q(W H), so the forward "
            f"would be wrong. Fix: {_FIX}."
        )
    if wq.rotated:
        raise RuntimeError(
            f"{where}: QuEST-quantized weights under DeepSpeed {zero} without the CAGE hooks "
            "(plain deepspeed.initialize, HF Trainer or accelerate): the optimizer sees flat "
            "ZeRO partitions, so the CAGE correction cannot run (CageAdamW fails or trains "
            f"without it). Fix: {_FIX}."
        )


QuantLinear.state_check = check_layer_state
