"""Quantization telemetry of a prepared model, as plain floats for a tracker.

Keys (``<type>`` = a layer's last name component, e.g. q_proj ... down_proj):
  quant/rel_error           sqrt(sum ||W - Q(W)||^2 / sum ||W||^2) over quantized weights
  quant/rel_error/<type>    the same over the layers of one type
  quant/masked_frac/weight  masked STE entries / all entries of the quantized weights,
  quant/masked_frac/act     and of the quantized activations, in the last backward
A key is absent when nothing contributes to it (no quantized weights, no forward with
grad yet). Layers in ``weight_prequantized`` mode hold q(W H), not the latent W: they add
no weight error or weight mask here (the optimizer side that owns the latent reports them).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .prepare import quantized_modules


@torch.no_grad()
def quant_stats(model: nn.Module) -> dict[str, float]:
    """Relative quantization errors and masked-gradient fractions (module docstring)."""
    sums: dict[str, list] = defaultdict(lambda: [0, 0])  # key -> [numerator, denominator]
    for name, layer in quantized_modules(model):
        wq = layer.weight_quantizer
        if wq is not None and not layer.weight_prequantized:
            w = layer.weight.detach().float()
            e2, w2 = wq.error(w).square().sum(), w.square().sum()
            for key in ("quant/rel_error", "quant/rel_error/" + name.rsplit(".", 1)[-1]):
                sums[key][0] += e2
                sums[key][1] += w2
        for side, (count, numel) in layer.masked_counts().items():
            sums["quant/masked_frac/" + side][0] += count
            sums["quant/masked_frac/" + side][1] += numel
    stats = {}
    for key, (num, den) in sorted(sums.items()):
        if key.startswith("quant/rel_error"):
            stats[key] = float(num / den) ** 0.5 if float(den) > 0 else 0.0
        elif den:
            stats[key] = float(num) / den
    return stats


def stats_from_table(layers: list[str], table: torch.Tensor) -> dict[str, float]:
    """The weight keys of quant_stats from a sharded adapter's all-reduced table: row i of
    ``table`` [len(layers), 4] holds (sum (W - Q(W))^2, sum W^2, masked STE entries, entries)
    of layer ``layers[i]``'s latent weight; masked_frac/weight = masked / entries."""
    sums: dict[str, torch.Tensor] = {}
    for layer, row in zip(layers, table, strict=True):
        for key in ("quant/rel_error", "quant/rel_error/" + layer.rsplit(".", 1)[-1]):
            sums[key] = sums.get(key, 0) + row[:2]
        sums["quant/masked_frac/weight"] = sums.get("quant/masked_frac/weight", 0) + row[2:]
    stats = {}
    for key, (num, den) in sorted(sums.items()):
        ratio = float(num / den) if float(den) > 0 else 0.0
        stats[key] = ratio**0.5 if key.startswith("quant/rel_error") else ratio
    return stats
