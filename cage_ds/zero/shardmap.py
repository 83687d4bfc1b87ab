"""Segment tables: which piece of which parameter each rank's flat ZeRO partition holds.

A flat partition (the 1-D fp32 tensor DeepSpeed hands the client optimizer) is a run of
pieces, one per parameter it touches, plus padding. A piece of parameter j (flattened,
row-major [rows, row_len]) covers elements [elem_start, elem_end) of it and sits at
[flat_start, flat_start + elem_end - elem_start) of the partition. Layouts:

  ZeRO-3: every parameter is cut on its own: ps_j = ceil(numel_j / world); rank r holds
          elements [r ps_j, min((r+1) ps_j, numel_j)); the sub-group's flat is the
          concatenation of these ps_j-long slots (garbage padding at the end of the last
          rank's slot).
  ZeRO-1/2: a group is flattened (parameter j at offset o_j, alignment padding between
          parameters and at the end) and cut evenly into world parts of length
          P = flat_numel // world; rank r holds [r P, (r+1) P) of the flat group.

Pure Python over metadata (shapes, offsets, world size): built identically on every rank
for every rank, so the cut-row exchange plans (rows.py) need no communication.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Elements [elem_start, elem_end) of parameter ``param`` (row length ``row_len``),
    stored at [flat_start, flat_start + length) of the partition."""

    param: int
    row_len: int
    flat_start: int
    elem_start: int
    elem_end: int

    @property
    def length(self) -> int:
        return self.elem_end - self.elem_start

    @property
    def rows(self) -> range:
        """Rows of the parameter this piece touches (first/last possibly cut)."""
        return range(self.elem_start // self.row_len, -(-self.elem_end // self.row_len))

    def cut_rows(self) -> list[int]:
        """Rows this piece holds only part of (their sums of squares need other ranks)."""
        n = self.row_len
        out = []
        first, last = self.elem_start // n, (self.elem_end - 1) // n
        if self.elem_start % n or self.elem_end < (first + 1) * n:
            out.append(first)
        if last != first and self.elem_end % n:
            out.append(last)
        return out

    def block_hull(self, block: int) -> tuple[int, int]:
        """[ea, eb): the piece widened to whole Hadamard blocks of ``block`` elements."""
        return (self.elem_start // block) * block, -(-self.elem_end // block) * block

    def partial_blocks(self, block: int) -> list[tuple[int, int]]:
        """Element ranges of this piece lying in blocks it does not hold whole."""
        a, b = self.elem_start, self.elem_end
        head_end = min(-(-a // block) * block, b)
        tail_start = max((b // block) * block, a)
        out = []
        if a % block:
            out.append((a, head_end))
        # a piece inside one block is covered by the head range alone (tail_start < head_end)
        if b % block and head_end <= tail_start < b:
            out.append((tail_start, b))
        return out


@dataclass(frozen=True)
class PartitionMap:
    """The segment table of one rank's flat partition of ``numel`` elements."""

    rank: int
    numel: int
    pieces: tuple[Piece, ...]

    def padding(self) -> list[tuple[int, int]]:
        """Flat ranges of the partition that belong to no parameter."""
        out, pos = [], 0
        for p in sorted(self.pieces, key=lambda q: q.flat_start):
            if p.flat_start > pos:
                out.append((pos, p.flat_start))
            pos = p.flat_start + p.length
        if pos < self.numel:
            out.append((pos, self.numel))
        return out


def _row_len(shape: tuple[int, ...]) -> int:
    return shape[-1] if len(shape) >= 1 and shape[-1] > 0 else 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def zero3_maps(shapes: list[tuple[int, ...]], world: int) -> list[PartitionMap]:
    """Segment tables of one ZeRO-3 sub-group (parameters in order) for ranks 0..world-1."""
    _check_world(world)
    maps = []
    for r in range(world):
        pieces, flat = [], 0
        for j, shape in enumerate(shapes):
            numel = _numel(shape)
            ps = -(-numel // world)
            a, b = min(r * ps, numel), min((r + 1) * ps, numel)
            if b > a:
                pieces.append(Piece(j, _row_len(shape), flat, a, b))
            flat += ps
        maps.append(PartitionMap(r, flat, tuple(pieces)))
    return maps


def zero12_maps(
    shapes: list[tuple[int, ...]], offsets: list[int], flat_numel: int, world: int
) -> list[PartitionMap]:
    """Segment tables of one ZeRO-1/2 flat group (parameter j at ``offsets[j]``)."""
    _check_world(world)
    if len(shapes) != len(offsets):
        raise ValueError(f"zero12_maps: {len(shapes)} shapes but {len(offsets)} offsets")
    if flat_numel % world:
        raise ValueError(
            f"zero12_maps: flat group of {flat_numel} elements not divisible by world {world}"
        )
    part = flat_numel // world
    maps = []
    for r in range(world):
        lo, hi = r * part, (r + 1) * part
        pieces = []
        for j, (shape, off) in enumerate(zip(shapes, offsets, strict=True)):
            numel = _numel(shape)
            a, b = max(lo, off), min(hi, off + numel)
            if b > a:
                pieces.append(Piece(j, _row_len(shape), a - lo, a - off, b - off))
        maps.append(PartitionMap(r, part, tuple(pieces)))
    return maps


def _check_world(world: int) -> None:
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
