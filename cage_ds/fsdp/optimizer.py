"""Row-shard CAGE ops for CageAdamW on FSDP2's dim-0 sharded DTensor parameters.

FSDP2 hands the optimizer DTensor parameters whose local part holds whole rows W_r of a
weight [out, in], and gradients dL/dq of the gathered q(W H) sharded the same way. A row's
QuEST scale and Hadamard blocks lie inside the row, so on the local rows
  error(W)       = W_r - Q(W_r)                       (Quantizer.error)
  ste_grad(W, g) = (M(W_r) ⊙ g_r) H                   (QuEST; RTN: g_r; a gradient that
                                                       to_latent_grads_ converted: as is)
equal the unsharded oracle's rows element for element. CageAdamW's update math is
unchanged: it runs on the DTensors, whose pointwise ops act on the local rows.
``attach(optimizer)`` serves them through ``CageAdamW.set_quant_ops`` (the ZeRO adapter's seam).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from cage_ds.optim import CageAdamW
from cage_ds.optim.quant_ops import quantizer_from_group
from cage_ds.quant import Quantizer

from .latent import is_latent_grad, latent_grad, local_rows


def _like(local: torch.Tensor, ref: DTensor) -> DTensor:
    """``local`` (this rank's rows) as a DTensor sharded like ``ref``."""
    return DTensor.from_local(
        local, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
        stride=ref.stride(),
    )  # fmt: skip


def check_row_sharded(p: torch.Tensor, where: str) -> None:
    """Raise unless p is a 2-D DTensor sharded on dim 0 only (FSDP2's layout)."""
    if not isinstance(p, DTensor) or p.dim() != 2:
        raise ValueError(
            f"{where}: expected a 2-D DTensor weight from fully_shard, got "
            f"{type(p).__name__} of shape {tuple(p.shape)}; call cage_ds.fsdp.prepare(model) "
            "before building the optimizer"
        )
    if any(pl != Shard(0) for pl in p.placements):
        raise ValueError(
            f"{where}: CAGE needs whole rows per rank (Shard(0)), got placements {p.placements}"
        )


class RowShardQuantOps:
    """TensorQuantOps of a dim-0 sharded DTensor weight (module docstring)."""

    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer

    def __repr__(self) -> str:
        return f"RowShardQuantOps({self.quantizer.spec})"

    def error(self, w: DTensor) -> DTensor:
        return _like(self.quantizer.error(local_rows(w)), w)

    def ste_grad(self, w: DTensor, g: DTensor) -> DTensor:
        if is_latent_grad(g) or not self.quantizer.rotated:
            return g
        return _like(latent_grad(self.quantizer, local_rows(w), local_rows(g)), g)


def _quant_ops(
    optimizer: CageAdamW, group: dict[str, Any], p: torch.Tensor
) -> RowShardQuantOps | None:
    if group.get("quant") is None:
        return None
    where = optimizer.describe_param(p)
    check_row_sharded(p, where)
    quantizer = quantizer_from_group(group["quant"], where)
    quantizer.spec.check_row_len(p.shape[1], where)
    return RowShardQuantOps(quantizer)


def attach(optimizer: CageAdamW) -> CageAdamW:
    """Give a CageAdamW built on a ``prepare``d model's parameters the row-shard ops;
    returns it. Raises if a quantized group holds a parameter FSDP2 did not shard on dim 0."""
    if not isinstance(optimizer, CageAdamW):
        raise TypeError(
            f"cage_ds.fsdp.attach: expected a CageAdamW, got {type(optimizer).__name__}"
        )
    for group in optimizer.param_groups:
        if group.get("quant") is not None:
            for p in group["params"]:
                check_row_sharded(p, optimizer.describe_param(p))
    optimizer.set_quant_ops(functools.partial(_quant_ops, optimizer))
    return optimizer
