"""The low-bit gather switch of a prepared model and the all-gather byte counts.

``set_lowbit_gather(model, on)`` re-chooses every quantized weight's gather (before the
first forward: FSDP2 sizes its gather buffers once). ``sent_bytes(model)`` sums what this
rank's quantized weights handed to the all-gathers (their inputs' numel * element_size);
``count_all_gathers(model)`` counts the bytes of every all-gather input FSDP2 sends for
the model (all parameters), through FSDP2's ``set_custom_all_gather``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .latent import GatherPlan, LatentWeight


def gather_plans(model: nn.Module) -> dict[str, GatherPlan]:
    """The GatherPlan of every quantized weight of a prepared model, by parameter name."""
    plans = {}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, torch.distributed.tensor.DTensor) else p
        if isinstance(local, LatentWeight):
            plans[name] = local.plan
    return plans


def set_lowbit_gather(model: nn.Module, lowbit: bool | None) -> None:
    """Gather the quantized weights low-bit (True), in values (False) or where the format
    allows it at world > 1 (None), as cage_ds.fsdp.prepare's ``lowbit_gather``."""
    for name, plan in gather_plans(model).items():
        plan.use_lowbit(lowbit, name)


def sent_bytes(model: nn.Module) -> int:
    """Bytes this rank's quantized weights handed to the all-gathers so far."""
    return sum(plan.sent for plan in gather_plans(model).values())


# FSDP2's default gathers with all_gather_single where torch has it (2.13: the older name
# warns that it is deprecated)
_all_gather = getattr(tdist, "all_gather_single", tdist.all_gather_into_tensor)


class CountingAllGather:
    """An all-gather for FSDP2's ``set_custom_all_gather`` (its AllGather interface:
    ``allocate`` and the call) that gathers as the default one and adds each call's input
    bytes to ``nbytes``."""

    def __init__(self) -> None:
        self.nbytes = 0

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        self.nbytes += input_tensor.numel() * input_tensor.element_size()
        return _all_gather(output_tensor, input_tensor, group, async_op)


def count_all_gathers(model: nn.Module) -> CountingAllGather:
    """Route every FSDP2 all-gather of ``model`` through one CountingAllGather (returned).
    At world 1 FSDP2 copies instead of gathering: nothing is counted."""
    counter = CountingAllGather()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(counter)
    return counter
