"""Quantization telemetry of a cage_ds.zero engine from the sharded quantizations, no gather.

Under cage_ds.zero the QuantLinear layers hold the gathered q(W H) (weight_prequantized), so
cage_ds.nn.quant_stats sees no latent weight; the latents live in the fp32 partitions. Each
rank adds, per quantized parameter, over the pieces it holds (from the quantization its
ShardedQuantOps already cached for the lp write of the last step):

    (sum (W - Q(W))^2, sum W^2, masked STE entries, entries)     float64

and one all-reduce of the [parameters, 4] table gives the same keys as cage_ds.nn.quant_stats:
  quant/rel_error           sqrt(sum ||W - Q(W)||^2 / sum ||W||^2) over quantized weights
  quant/rel_error/<type>    the same over the layers of one type (q_proj ... down_proj)
  quant/masked_frac/weight  masked entries / entries of the STE mask of the current latents,
                            i.e. the mask the next backward applies (RTN: 0)
  quant/masked_frac/act     from cage_ds.nn.quant_stats (the activations of the last backward)
Collective: every rank of the data-parallel group calls it at the same point.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

from cage_ds.nn import quant_stats as module_quant_stats
from cage_ds.nn import quantized_modules
from cage_ds.nn.telemetry import stats_from_table

from .engine import attachment


def _layer_of(param_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj'."""
    return param_name.rsplit(".", 1)[0]


@torch.no_grad()
def quant_stats(engine: Any) -> dict[str, float]:
    """Telemetry of an engine built by cage_ds.zero.initialize (module docstring)."""
    state = attachment(engine)
    if state is None:
        raise TypeError(
            "cage_ds.zero.quant_stats needs an engine from cage_ds.zero.initialize, got "
            f"optimizer {type(engine.optimizer).__name__} without CAGE hooks"
        )
    prequantized = {}
    for name, layer in quantized_modules(engine.module):
        if layer.weight_quantizer is None:
            continue
        if not layer.weight_prequantized:
            raise RuntimeError(
                f"cage_ds.zero.quant_stats: layer {name} fake-quantizes its own weight; under "
                "cage_ds.zero every weight-quantized layer consumes the gathered q(W H)"
            )
        prequantized[name] = layer
    stats = module_quant_stats(engine.module)  # activations only: every weight is prequantized
    rows, layers = [], []
    parts = state.partitions
    for hp, ops in parts:
        rows.append(ops.piece_sums(hp))
        layers += [_layer_of(ops.param_names[j]) for j in ops.slots()]
    uncovered = sorted(set(prequantized) - set(layers))
    if uncovered:
        raise RuntimeError(
            f"cage_ds.zero.quant_stats: layers {uncovered[:4]} are weight_prequantized but "
            "their weights are in no quantized ZeRO partition"
        )
    if not rows:
        return stats
    table = torch.cat(rows)
    groups = {id(ops.group) for _, ops in parts}
    if len(groups) != 1:
        raise RuntimeError("cage_ds.zero.quant_stats: partitions over different process groups")
    if tdist.is_initialized() and tdist.get_world_size(parts[0][1].group) > 1:
        tdist.all_reduce(table, group=parts[0][1].group)
    stats.update(stats_from_table(layers, table))
    return dict(sorted(stats.items()))
