"""Quantization telemetry of a cage_ds.fsdp model from the local latent rows, no gather.

Under cage_ds.fsdp every weight-quantized QuantLinear consumes the gathered q(W H)
(weight_prequantized), so cage_ds.nn.quant_stats sees no latent; the latents are the
LatentWeight rows each rank holds. Each rank adds, per such layer, over its rows (one
quantization of the current latents):

    (sum (W - Q(W))^2, sum W^2, masked STE entries, entries)     float64

and one all-reduce of the [layers, 4] table over the mesh gives cage_ds.nn.quant_stats's keys
(cage_ds.nn.telemetry.stats_from_table), as cage_ds.zero.quant_stats does under ZeRO:
quant/rel_error(/<type>), quant/masked_frac/weight (the mask the next backward applies; RTN:
0) and quant/masked_frac/act (from the last backward). Collective: every rank calls it.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.tensor import DTensor

from cage_ds.nn import quant_stats as module_quant_stats
from cage_ds.nn import quantized_modules
from cage_ds.nn.telemetry import stats_from_table

from .latent import LatentWeight, local_rows
from .prepare import reshard


def _row_sums(layer_name: str, layer: nn.Module) -> torch.Tensor:
    """float64 [4]: this rank's (sum e^2, sum w^2, masked entries, entries) of the layer."""
    p = layer.weight
    if not isinstance(p, DTensor) or not isinstance(p.to_local(), LatentWeight):
        raise TypeError(
            f"cage_ds.fsdp.quant_stats: {layer_name}.weight is {type(p).__name__}, not a sharded "
            "LatentWeight; pass a model returned by cage_ds.fsdp.prepare"
        )
    rows = local_rows(p).detach()
    out = torch.zeros(4, dtype=torch.float64, device=rows.device)
    if rows.numel():
        q = layer.weight_quantizer.evaluate(rows.float())
        out[0] = q.error.double().square().sum()
        out[1] = rows.double().square().sum()
        out[2] = (~q.mask).sum()
        out[3] = rows.numel()
    return out


@torch.no_grad()
def quant_stats(model: nn.Module) -> dict[str, float]:
    """Telemetry of a cage_ds.fsdp.prepare'd model (module docstring)."""
    reshard(model)  # the latents, not an evaluation's gathered weights
    stats = module_quant_stats(model)  # activations only: every weight is prequantized
    layers = [(n, m) for n, m in quantized_modules(model) if m.weight_quantizer is not None]
    if not layers:
        return stats
    table = torch.stack([_row_sums(n, m) for n, m in layers])
    mesh = layers[0][1].weight.device_mesh
    if mesh.size() > 1:
        tdist.all_reduce(table, group=mesh.get_group())
    stats.update(stats_from_table([n for n, _ in layers], table))
    return dict(sorted(stats.items()))
