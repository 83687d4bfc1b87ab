"""Segment tables: which whole rows of which parameters a flat fp32 shard holds.

A ZeRO partition is one flat buffer; a ``Segment`` names a run of WHOLE rows of one
parameter inside it (row = one output row of a weight: its QuEST scale and Hadamard blocks
live entirely inside). Elements of the buffer that no segment covers (ZeRO padding, pieces
of rows cut by the partition boundary) are never read or written by the shard kernels.

Cut rows: a row that straddles ranks is NOT a segment of either rank's table. The caller
(the ZeRO adapter) assembles each cut row whole (its param / grad / exp_avg / exp_avg_sq
elements from the ranks that hold them) into a small side buffer, runs the same step on it
with its own table, and keeps its local part. That side buffer is the "halo": it is exact
(Q needs the row's sum of squares AND every element of each cut Hadamard block of the
UPDATED weight, which no input precomputed before the step can supply).

Builders: ``shard_segments(layouts, lo, hi)`` cuts a flat stream of parameters
(``ParamLayout``: where each sits, its rows, bits) at [lo, hi) into the shard's segments and
its ``CutRow``s; ``halo_segments(cuts)`` lays the cut rows out in the side buffer.

Tensor form (``SegmentTable.tensor``): int64 [segments, 7], columns COLUMNS:
  param_id      the caller's id of the parameter (bookkeeping; the kernels ignore it)
  shard_start   flat index in the shard of the segment's first element
  param_offset  flat index within the parameter of that element (quantized: a row start)
  n_rows        whole rows in the segment
  row_len       elements per row (quantized: a multiple of the table's Hadamard block)
  bits          grid bits 1..8, or 0 for a parameter without a quantizer (plain AdamW)
  flags         FLAG_STE: the grad is dL/dq in the rotated domain (the weight was consumed
                pre-quantized): apply the STE mask of the old weight, then rotate back
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .grid import check_bits
from .hadamard import check_block
from .sumsq import next_pow2

COLUMNS = ("param_id", "shard_start", "param_offset", "n_rows", "row_len", "bits", "flags")
FLAG_STE = 1


@dataclass(frozen=True)
class Segment:
    """Whole rows [param_offset, param_offset + n_rows row_len) of a parameter, stored at
    shard[shard_start : shard_start + n_rows row_len]."""

    param_id: int
    shard_start: int
    param_offset: int
    n_rows: int
    row_len: int
    bits: int = 0
    """0: no quantizer on this parameter; else the QuEST grid bits."""
    ste: bool = False
    """The grad arrives in the rotated domain (dL/dq): mask it and rotate it back."""

    def __post_init__(self) -> None:
        for name in ("param_id", "shard_start", "param_offset", "n_rows", "row_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Segment.{name} must be an int >= 0, got {value!r}")
        if self.row_len < 1:
            raise ValueError(f"Segment.row_len must be >= 1, got {self.row_len}")
        if self.bits and self.param_offset % self.row_len:
            raise ValueError(
                f"Segment of param {self.param_id}: param_offset {self.param_offset} is not at a "
                f"row start (row_len {self.row_len}); cut rows belong in the halo buffer"
            )
        if self.bits:
            check_bits(self.bits)
        elif self.ste:
            raise ValueError(f"Segment of param {self.param_id}: ste=True needs bits > 0")

    @property
    def numel(self) -> int:
        return self.n_rows * self.row_len

    def row(self) -> list[int]:
        """The segment as one row of the int64 table (see COLUMNS)."""
        flags = FLAG_STE if self.ste else 0
        return [self.param_id, self.shard_start, self.param_offset, self.n_rows, self.row_len,
                self.bits, flags]  # fmt: skip


def plain_segments(
    param_id: int, shard_start: int, param_offset: int, numel: int, row_len: int = 2048
) -> list[Segment]:
    """A run of an unquantized parameter as rows of ``row_len`` (+ one shorter tail row).

    Without a quantizer rows are only a storage choice: any split updates the same elements.
    """
    whole, tail = divmod(numel, row_len)
    segs = []
    if whole:
        segs.append(Segment(param_id, shard_start, param_offset, whole, row_len))
    if tail:
        done = whole * row_len
        segs.append(Segment(param_id, shard_start + done, param_offset + done, 1, tail))
    return segs


@dataclass(frozen=True)
class SegmentTable:
    """All segments of one flat shard, with the table-wide Hadamard block and mask rule."""

    segments: tuple[Segment, ...]
    block: int = 128
    mask_rule: str = "trust"

    def __post_init__(self) -> None:
        check_block(self.block)
        if self.mask_rule not in ("trust", "clip"):
            raise ValueError(
                f"SegmentTable.mask_rule must be 'trust' or 'clip', got {self.mask_rule!r}"
            )
        for seg in self.segments:
            if seg.bits and seg.row_len % self.block:
                raise ValueError(
                    f"param {seg.param_id}: row_len {seg.row_len} is not a multiple of the "
                    f"hadamard block {self.block}"
                )
        spans = sorted((s.shard_start, s.shard_start + s.numel, s.param_id) for s in self.segments)
        for (_, end, pid), (start, _, nxt) in itertools.pairwise(spans):
            if start < end:
                raise ValueError(f"segments of params {pid} and {nxt} overlap in the shard")

    @property
    def width(self) -> int:
        """Tile width: next power of two of the longest row (>= block, >= 8)."""
        longest = max((s.row_len for s in self.segments), default=1)
        return max(next_pow2(longest), self.block, 8)

    def by_width(self) -> tuple[SegmentTable, ...]:
        """The table split into tables of one tile width each, narrowest first. A kernel
        launched per part gives every row the tree order of its own width (sumsq.tree_dims
        differs between widths, e.g. 4 warps at 1024 and 8 at 2048) and pads no row beyond
        its own power of two."""
        parts: dict[int, list[Segment]] = {}
        for seg in self.segments:
            width = SegmentTable((seg,), self.block, self.mask_rule).width
            parts.setdefault(width, []).append(seg)
        return tuple(
            SegmentTable(tuple(parts[w]), self.block, self.mask_rule) for w in sorted(parts)
        )

    @property
    def end(self) -> int:
        """One past the last shard element any segment covers."""
        return max((s.shard_start + s.numel for s in self.segments), default=0)

    def check_shard(self, numel: int, what: str = "shard") -> None:
        """Raise if a segment reaches past a buffer of ``numel`` elements."""
        if self.end > numel:
            raise ValueError(f"segment table covers {self.end} elements but the {what} has {numel}")

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [segments, len(COLUMNS)]."""
        rows = [s.row() for s in self.segments]
        return torch.tensor(rows, dtype=torch.int64, device=device).view(-1, len(COLUMNS))

    def tiles(self, rows_per_tile: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [tiles, 2]: (segment index, first row) of every tile of rows_per_tile rows."""
        n_rows = torch.tensor([s.n_rows for s in self.segments], dtype=torch.int64)
        counts = (n_rows + rows_per_tile - 1) // rows_per_tile
        seg = torch.repeat_interleave(torch.arange(len(self.segments)), counts)
        first = torch.cumsum(counts, 0) - counts
        row0 = (torch.arange(seg.numel()) - first[seg]) * rows_per_tile
        return torch.stack((seg, row0), 1).to(device)


@dataclass(frozen=True)
class ParamLayout:
    """Where a parameter sits in a flat stream that is cut into shards (e.g. a ZeRO group)."""

    param_id: int
    start: int
    """Flat index of the parameter's first element in the stream."""
    numel: int
    row_len: int
    bits: int = 0
    ste: bool = False


@dataclass(frozen=True)
class CutRow:
    """A quantized row that straddles a shard boundary: [stream_start, stream_start + row_len)."""

    param_id: int
    param_offset: int
    stream_start: int
    row_len: int
    bits: int
    ste: bool


def shard_segments(
    layouts: list[ParamLayout], lo: int, hi: int
) -> tuple[list[Segment], list[CutRow]]:
    """Segments of the shard = stream[lo:hi) (shard_start relative to lo), and its cut rows.

    Quantized parameters contribute their whole rows inside [lo, hi); a row crossing lo or hi
    is returned as a CutRow (for the halo buffer; the shard whose range holds the row's first
    element owns it, the other shard also lists it). Unquantized parameters contribute their
    whole overlap.
    """
    segs: list[Segment] = []
    cuts: list[CutRow] = []
    for p in layouts:
        a, b = max(lo, p.start), min(hi, p.start + p.numel)
        if a >= b:
            continue
        if not p.bits:
            segs += plain_segments(p.param_id, a - lo, a - p.start, b - a)
            continue
        first = -(-(a - p.start) // p.row_len)  # first row starting at or after a
        last = (b - p.start) // p.row_len  # rows [first, last) lie wholly inside
        if last > first:
            at = p.start + first * p.row_len
            segs.append(Segment(p.param_id, at - lo, first * p.row_len, last - first, p.row_len,
                                p.bits, p.ste))  # fmt: skip
        for row in {(a - p.start) // p.row_len, (b - 1 - p.start) // p.row_len}:
            if not first <= row < last:
                start = p.start + row * p.row_len
                cuts.append(CutRow(p.param_id, row * p.row_len, start, p.row_len, p.bits, p.ste))
    return segs, sorted(cuts, key=lambda c: c.stream_start)


def halo_segments(cuts: list[CutRow]) -> list[Segment]:
    """Segments of a side buffer holding the cut rows whole, back to back, in order."""
    segs, at = [], 0
    for c in cuts:
        segs.append(Segment(c.param_id, at, c.param_offset, 1, c.row_len, c.bits, c.ste))
        at += c.row_len
    return segs
