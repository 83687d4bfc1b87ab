"""ZeRO-1/2's parameter all-gather of CAGE-quantized flat groups as low-bit payloads.

Pinned to deepspeed==0.19.8: after every step (and in update_lp_params) DeepSpeedZeroOptimizer
and BF16_Optimizer call the module-level ``all_gather_dp_groups(groups_flat=,
partitioned_param_groups=, dp_process_group=, ...)`` of stage_1_and_2 / bf16_optimizer, which
gathers group i's partitions (``partitioned_param_groups[i][r]``, views of world equal slots of
``groups_flat[i]``) into ``groups_flat[i]``, the flat bit16 buffer the module's parameters
view. engine._install_gather_patch wraps it; for an optimizer with a FlatLowbitGather, each
served group (all its parameters CAGE-quantized) travels as one cage_ds.quant.lowbit payload
per rank (WireFormat.flat: the codes of its whole slot, padding 0, and the scales it owns),
decoded into ``groups_flat[i]`` (0 on padding, which stock holds as 0 too: DeepSpeed pads the
flat and the fp32 master with zeros and the step leaves them so); the other groups keep the
stock call. With ``enabled`` False the served groups take their own stock call, marked
'quantized' for byte counters (cage_ds.zero.gather.current_kind) like the low-bit one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from deepspeed import comm as ds_comm

from cage_ds.quant.lowbit import WireFormat, decode, encode

from .gather import _KIND
from .optimizer import ShardedQuantOps


class FlatLowbitGather:
    """The low-bit gather of one ZeRO-1/2 (or BF16_Optimizer) wrapper's quantized flat groups.

    groups: {flat group i: (its ops, its format, this rank's fp32 master partition, process
    group)}."""

    def __init__(
        self, groups: dict[int, tuple[ShardedQuantOps, WireFormat, torch.Tensor, Any]],
        enabled: bool = True,
    ):  # fmt: skip
        self.groups, self.enabled = groups, enabled
        self.gathers = 0

    def run(self, groups_flat: list[torch.Tensor], stock: Callable[[list[int]], None]) -> None:
        """All-gather every flat group; ``stock(ids)`` gathers groups ``ids`` DeepSpeed's way."""
        mine = [i for i in range(len(groups_flat)) if i in self.groups]
        token = _KIND.set("quantized")
        try:
            if not self.enabled and mine:
                stock(mine)
            elif mine:
                for i in mine:
                    self._gather(i, groups_flat[i])
        finally:
            _KIND.reset(token)
        rest = [i for i in range(len(groups_flat)) if i not in self.groups]
        if rest:
            stock(rest)

    def _gather(self, i: int, flat: torch.Tensor) -> None:
        ops, fmt, hp, pg = self.groups[i]
        parts = ops.wire_parts(hp)
        none = (hp.new_zeros(0, dtype=torch.uint8), hp.new_zeros(0))
        codes, scales = (torch.cat([parts[j][k].reshape(-1) for j in sorted(parts)] or [none[k]])
                         for k in (0, 1))  # fmt: skip
        send = encode(fmt, ops.layout.rank, codes, scales)
        out = send.new_empty(fmt.world * send.numel())
        ds_comm.allgather_fn(out, send, group=pg)
        flat.copy_(decode(fmt, out.view(fmt.world, -1), flat.dtype))
        self.gathers += 1
