"""A rank's flat ZeRO partition as whole rows: runs in place, cut rows assembled whole.

Everything CAGE computes per quantized row (the QuEST row scale, the Hadamard blocks, the
fused CAGE-AdamW step) lives inside one row, so every rank works on whole rows only:
  runs      the rows a piece of the partition holds entirely, as kernel ``Segment``s whose
            shard_start is the flat index in the partition: computed in place;
  cut rows  the rows the rank holds only part of (a ZeRO cut falls inside them): assembled
            whole, back to back, in a side buffer laid out by ``side_segments``, from the
            parts their other holders send point to point (neighbours only).
Every holder of a cut row computes it on identical inputs, so all holders agree bit for
bit and each keeps its own part (``scatter``); results equal the unsharded computation of
the same rows at any world size, whatever the cuts.

Planning is pure Python over every rank's PartitionMap, identical on all ranks, so the
exchange needs no handshake. Tensor movement is split from communication so tests can
drive every rank in one process: ``outgoing(tensors)`` is what this rank sends to each
peer, ``assemble(tensors, incoming)`` builds the side buffer; ``exchange_rows`` runs both
around point-to-point sends.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from cage_kernels.segments import Segment

from .shardmap import PartitionMap


@dataclass(frozen=True)
class RowPart:
    """Elements [row_offset, row_offset + length) of a cut row, held by ``rank`` at
    [flat_start, flat_start + length) of its partition."""

    rank: int
    flat_start: int
    row_offset: int
    length: int


@dataclass(frozen=True)
class SplitRow:
    """Row ``row`` (``row_len`` elements) of parameter ``param``, cut across ``parts``."""

    param: int
    row: int
    row_len: int
    parts: tuple[RowPart, ...]


def split_rows(maps: list[PartitionMap]) -> list[SplitRow]:
    """Every row that some cut divides, sorted by (param, row), parts in rank order."""
    parts: dict[tuple[int, int], list[RowPart]] = defaultdict(list)
    lengths: dict[int, int] = {}
    for m in maps:
        for p in m.pieces:
            n = lengths.setdefault(p.param, p.row_len)
            for r in p.cut_rows():
                lo, hi = max(p.elem_start, r * n), min(p.elem_end, (r + 1) * n)
                parts[(p.param, r)].append(
                    RowPart(m.rank, p.flat_start + lo - p.elem_start, lo - r * n, hi - lo)
                )
    return [
        SplitRow(j, r, lengths[j], tuple(sorted(ps, key=lambda q: q.rank)))
        for (j, r), ps in sorted(parts.items())
    ]


def _ranges(pairs: list[tuple[int, int]]) -> torch.Tensor:
    """int64 indices of the ranges [start, start + length) in order."""
    if not pairs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(a, a + n) for a, n in pairs])


class RowLayout:
    """Rank ``rank``'s partition as whole rows (module docstring).

    bits / ste fill the segments' fields (kernel tables; ste: the gradient arrives as
    dL/dq in the rotated domain); splits: ``split_rows(maps)`` when already computed.
    """

    def __init__(
        self,
        maps: list[PartitionMap],
        rank: int,
        bits: int,
        ste: bool,
        splits: list[SplitRow] | None = None,
    ):
        self.rank, self.world = rank, len(maps)
        self.map = maps[rank]
        runs = []
        for p in self.map.pieces:
            n = p.row_len
            first, last = -(-p.elem_start // n), p.elem_end // n
            if last > first:
                start = p.flat_start + first * n - p.elem_start
                runs.append(Segment(p.param, start, first * n, last - first, n, bits, ste))
        self.runs = tuple(runs)
        side, at = [], 0
        own: list[tuple[int, int, int]] = []  # (flat_start, side position, length)
        send: dict[int, list[tuple[int, int]]] = defaultdict(list)
        recv: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for s in split_rows(maps) if splits is None else splits:
            mine = [q for q in s.parts if q.rank == rank]
            if not mine:
                continue
            side.append(Segment(s.param, at, s.row * s.row_len, 1, s.row_len, bits, ste))
            for q in s.parts:
                if q.rank == rank:
                    own.append((q.flat_start, at + q.row_offset, q.length))
                    continue
                recv[q.rank].append((at + q.row_offset, q.length))
                send[q.rank] += [(m.flat_start, m.length) for m in mine]
            at += s.row_len
        self.side_segments = tuple(side)
        self.side_numel = at
        self.peers = sorted(recv)
        self._own_flat = _ranges([(f, n) for f, _, n in own])
        self._own_side = _ranges([(a, n) for _, a, n in own])
        self._send = {r: _ranges(send[r]) for r in self.peers}
        self._recv = {r: _ranges(recv[r]) for r in self.peers}
        self._on: dict[torch.device, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return (
            f"RowLayout(rank {self.rank}/{self.world}: {len(self.runs)} runs, "
            f"{len(self.side_segments)} cut rows, peers {self.peers})"
        )

    @property
    def run_numel(self) -> int:
        return sum(s.numel for s in self.runs)

    def _index(self, device: torch.device) -> dict[str, Any]:
        """The index tensors on ``device`` (moved once per device)."""
        if device not in self._on:
            self._on[device] = {
                "own_flat": self._own_flat.to(device),
                "own_side": self._own_side.to(device),
                "send": {r: t.to(device) for r, t in self._send.items()},
                "recv": {r: t.to(device) for r, t in self._recv.items()},
            }
        return self._on[device]

    @property
    def received_per_tensor(self) -> int:
        """Elements the peers send for each exchanged tensor."""
        return sum(t.numel() for t in self._recv.values())

    def incoming_numel(self, peer: int, k: int) -> int:
        """Elements of the payload ``peer`` sends for k tensors."""
        return k * self._recv[peer].numel()

    def outgoing(self, tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """{peer: my parts of the rows we share, tensor after tensor}, 1-D."""
        idx = self._index(tensors[0].device)["send"]
        return {r: torch.cat([t.index_select(0, idx[r]) for t in tensors]) for r in self.peers}

    def assemble(
        self, tensors: list[torch.Tensor], incoming: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """[len(tensors), side_numel]: my cut rows whole, from my parts and the peers'."""
        ix = self._index(tensors[0].device)
        side = tensors[0].new_empty(len(tensors), self.side_numel)
        for i, t in enumerate(tensors):
            side[i].index_copy_(0, ix["own_side"], t.index_select(0, ix["own_flat"]))
        for r in self.peers:
            side.index_copy_(1, ix["recv"][r], incoming[r].view(len(tensors), -1))
        return side

    def scatter(self, side: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """tensors[i][my parts] <- side[i] at those parts (side: [len(tensors), side_numel])."""
        if not self.side_numel:
            return
        ix = self._index(side.device)
        for i, t in enumerate(tensors):
            t.index_copy_(0, ix["own_flat"], side[i].index_select(0, ix["own_side"]))


def exchange_rows(
    layout: RowLayout, tensors: list[torch.Tensor], group: Any = None
) -> tuple[torch.Tensor, int]:
    """layout.assemble with every peer's parts received point to point; returns the side
    buffer and the bytes received. Every rank of ``group`` holding a cut row calls it at the
    same point (ranks without cut rows skip the sends and receives)."""
    sent = layout.outgoing(tensors)
    incoming = {
        r: tensors[0].new_empty(layout.incoming_numel(r, len(tensors))) for r in layout.peers
    }
    ops = []
    for r in layout.peers:  # batched: NCCL groups the pairs' sends and receives (no deadlock)
        ops.append(tdist.P2POp(tdist.isend, sent[r], group=group, group_peer=r))
        ops.append(tdist.P2POp(tdist.irecv, incoming[r], group=group, group_peer=r))
    for req in tdist.batch_isend_irecv(ops) if ops else ():
        req.wait()
    received = sum(t.numel() * t.element_size() for t in incoming.values())
    return layout.assemble(tensors, incoming), received
