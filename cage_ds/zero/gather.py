"""ZeRO-3's forward / backward all-gather of CAGE-quantized weights as low-bit payloads.

Pinned to deepspeed==0.19.8: the coordinator fetches with ``params[0].all_gather_coalesced(
params, quantize=...)``, a per-parameter closure of partition_parameters.Init; it is
replaced on every parameter of the engine's module by a wrapper that takes the CAGE-quantized
weights out of the list and gathers them as cage_ds.quant.lowbit payloads (encoded by
``refresh`` right after the hooks write a sub-group's lp partition); the other parameters
keep the stock call. Synchronous gathers (``param.all_gather()``: persistent parameters,
GatheredParameters, 16-bit saves) stay stock: the lp partition still holds the values.
With ``enabled`` False the quantized weights still travel in their own stock call, so byte
counters can tell the two kinds apart (``current_kind``).
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
from deepspeed import comm as ds_comm
from deepspeed.runtime.zero.partition_parameters import MultipleAllGatherHandles
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus as Status

from cage_ds.quant.lowbit import WireFormat, decode, encode

from .optimizer import ShardedQuantOps

_KIND: contextvars.ContextVar[str] = contextvars.ContextVar("cage_gather_kind", default="other")


def current_kind() -> str:
    """'quantized' while a gather of CAGE-quantized weights is being issued, else 'other'."""
    return _KIND.get()


class LowbitGather:
    """Payloads of one ZeRO-3 optimizer's CAGE-quantized weights and the gather override."""

    def __init__(self, opt: Any, by_sid: dict[int, ShardedQuantOps], enabled: bool):
        self.opt, self.by_sid, self.enabled = opt, by_sid, enabled
        self.group = opt.dp_process_group
        self.world, self.rank = ds_comm.get_world_size(self.group), ds_comm.get_rank(self.group)
        self.formats: dict[int, tuple[WireFormat, int]] = {}  # id(param) -> (format, sid)
        for sid, ops in by_sid.items():
            spec = ops.quantizer.spec
            for p in opt.fp16_groups[sid]:
                fmt = WireFormat.of(spec, p.ds_numel, p.ds_shape[-1], self.world)
                self.formats[id(p)] = (fmt, sid)
        self.payload: dict[int, torch.Tensor] = {}
        self.version: dict[int, int] = {}
        self.gathers = 0

    def refresh(self, sid: int) -> None:
        """Encode sub-group sid's payloads from its fp32 master (after its lp write)."""
        hp = self.opt.fp32_partitioned_groups_flat[sid]
        parts = self.by_sid[sid].wire_parts(hp)
        none = (hp.new_zeros(0, dtype=torch.uint8), hp.new_zeros(0))  # a rank holding no element
        for j, p in enumerate(self.opt.fp16_groups[sid]):
            fmt = self.formats[id(p)][0]
            self.payload[id(p)] = encode(fmt, self.rank, *parts.get(j, none))
        self.version[sid] = self.opt.fp16_partitioned_groups_flat[sid]._version

    def install(self, module: torch.nn.Module) -> None:
        for p in module.parameters():
            if hasattr(p, "all_gather_coalesced"):
                p.all_gather_coalesced = self._wrap(p.all_gather_coalesced)

    def _wrap(self, original):
        def all_gather_coalesced(params, safe_mode: bool = False, quantize: bool = False):
            params = list(params)
            mine = [p for p in params if id(p) in self.formats]
            if not mine or quantize:
                return original(params, safe_mode=safe_mode, quantize=quantize)
            rest = [p for p in params if id(p) not in self.formats]
            token = _KIND.set("quantized")
            try:
                first = self._gather(mine) if self.enabled else original(mine, safe_mode=safe_mode)
            finally:
                _KIND.reset(token)
            if not rest:
                return first
            return MultipleAllGatherHandles([first, original(rest, safe_mode=safe_mode)])

        return all_gather_coalesced

    def _gather(self, params: list) -> _Handle:
        params = sorted(params, key=lambda p: p.ds_id)  # the same order on every rank
        for p in params:
            sid = self.formats[id(p)][1]
            if self.opt.fp16_partitioned_groups_flat[sid]._version != self.version.get(sid):
                raise RuntimeError(
                    f"cage_ds.zero low-bit gather: the lp partition of sub-group {sid} changed "
                    "after its payload was encoded (a write outside the CAGE hooks); pass "
                    "lowbit_gather=False to cage_ds.zero.initialize"
                )
            if p.ds_status != Status.NOT_AVAILABLE:
                raise RuntimeError(f"cage_ds.zero low-bit gather: {p.ds_summary()} not partitioned")
            p.ds_status = Status.INFLIGHT
        send = torch.cat([self.payload[id(p)] for p in params])
        out = send.new_empty(self.world * send.numel())
        handle = ds_comm.allgather_fn(out, send, group=self.group, async_op=True)
        self.gathers += 1
        return _Handle(handle, params, out.view(self.world, -1), self.formats)


class _Handle:
    """Waits for a low-bit gather, then decodes every parameter into its compute tensor."""

    def __init__(self, handle: Any, params: list, out: torch.Tensor, formats: dict):
        self.handle, self.params, self.out, self.formats = handle, params, out, formats
        self.complete = False

    def wait(self, handle_dependency: bool = True) -> None:
        if self.complete:
            return
        self.handle.wait()
        off = 0
        for p in self.params:
            fmt = self.formats[id(p)][0]
            chunk = self.out[:, off : off + fmt.nbytes]
            p.data = decode(fmt, chunk, p.ds_tensor.dtype).view(p.ds_shape)
            p.ds_status = Status.AVAILABLE
            off += fmt.nbytes
        if self.out.is_cuda:  # received on the gather stream, decoded on this one: keep the
            self.out.record_stream(torch.cuda.current_stream())  # buffer until decode ran
        self.complete = True
