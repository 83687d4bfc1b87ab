"""Wire format of a low-bit all-gather: packed b-bit codes plus fp32 group scales.

A sharded parameter of N elements (flattened row-major) is cut into slots of ps elements;
rank r holds [a_r, b_r) = [min(r ps, N), min((r+1) ps, N)]. ZeRO-3 cuts ps = ceil(N / world)
(rows may be cut); FSDP2 cuts whole rows, ps = ceil(rows / world) row_len. Scale groups are
G consecutive elements (a row for QuEST, an RTN group; G divides the row length).
Rank r sends, for this parameter, ``nbytes`` bytes (the same on every rank):
  [slots fp32 scales][ceil(ps / 8) b bytes of packed codes][zero fill to a multiple of 4]
  scales: those of the groups whose FIRST element rank r holds, in order (the owner of a
          group a cut divides is the rank holding its start; under ZeRO-3 every holder of a
          cut row computed the whole row, cage_ds.zero.rows), zero-filled to
          slots = max_r of that count;
  codes:  k of every element rank r holds (cage_kernels.pack layout), 0 past b_r.
A flat of several parameters (ZeRO-1/2: a group flattened with padding, cut into world
slots of ps = numel / world elements) has ``members`` (offset, numel, group), one per
parameter: rank r holds flat [r ps, (r+1) ps); its codes sit at their flat positions in the
slot (0 on padding) and its scales are those it owns of every member, members in flat order
(rank-major order is then the global member-major order of the groups).
Decoding the gathered [world, nbytes] gives value = cast((k - z) s): z = (2^b - 1) / 2 for
QuEST (cage_kernels.ops.dequantize), z = 2^(b-1) - 1 for RTN: the expression the quantizer
evaluates for its values, so the result equals a gather of cast(values) bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from cage_kernels import ops as kernel_ops

from .spec import QuantSpec


def allowed(bits: int, dtype: torch.dtype) -> bool:
    """The format serves b <= 8 bit grids gathered into bf16 / fp32 (codes fit a byte)."""
    return 1 <= bits <= 8 and dtype in (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class WireFormat:
    """The low-bit payload layout of one parameter or one flat of several (module
    docstring); method 'quest' or 'rtn'; slot: elements per rank (None: ZeRO-3's
    ceil(numel / world)); members: (flat offset, numel, scale group) of every parameter of
    a flat (None: one parameter, (0, numel, group))."""

    numel: int
    world: int
    bits: int
    group: int
    method: str
    slot: int | None = None
    members: tuple[tuple[int, int, int], ...] | None = None

    @classmethod
    def of(cls, spec: QuantSpec, numel: int, row_len: int, world: int, slot: int | None = None):
        """The format of a weight with rows of ``row_len`` quantized by ``spec``."""
        group = row_len if spec.method == "quest" else spec.group_size
        return cls(numel, world, spec.bits, group, spec.method, slot)

    @classmethod
    def flat(
        cls, spec: QuantSpec, shapes: list[tuple[int, int]], offsets: list[int], numel: int,
        world: int,
    ) -> WireFormat:  # fmt: skip
        """The format of a ZeRO-1/2 flat group of ``numel`` elements (parameter j of
        ``shapes[j]`` at ``offsets[j]``, ascending), cut into world equal slots."""
        if numel % world or list(offsets) != sorted(offsets):
            raise ValueError(
                f"low-bit gather: a flat of {numel} elements over world {world} with offsets "
                f"{list(offsets)[:4]}... is not an even cut of ascending parameters"
            )
        members = tuple(
            (o, r * n, n if spec.method == "quest" else spec.group_size)
            for (r, n), o in zip(shapes, offsets, strict=True)
        )
        return cls(numel, world, spec.bits, 0, spec.method, numel // world, members)

    @property
    def parts(self) -> tuple[tuple[int, int, int], ...]:
        """(offset, numel, group) of every parameter, in flat order."""
        return self.members if self.members is not None else ((0, self.numel, self.group),)

    @property
    def ps(self) -> int:
        return self.slot if self.slot is not None else -(-self.numel // self.world)

    def span(self, rank: int) -> tuple[int, int]:
        """[a, b): the flat elements ``rank`` holds."""
        return min(rank * self.ps, self.numel), min((rank + 1) * self.ps, self.numel)

    def pieces(self, rank: int) -> list[tuple[int, int, int, int]]:
        """(member, a, b, group) per member: the member's elements [a, b) ``rank`` holds
        (a == b when none)."""
        lo, hi = self.span(rank)
        return [(j, min(max(lo - o, 0), n), min(max(hi - o, 0), n), g)
                for j, (o, n, g) in enumerate(self.parts)]  # fmt: skip

    def owned(self, rank: int) -> tuple[int, int]:
        """[g0, g1): the scale groups (numbered over all members in flat order) whose first
        element ``rank`` holds."""
        pieces = self.pieces(rank)
        return sum(-(-a // g) for _, a, _, g in pieces), sum(-(-b // g) for _, _, b, g in pieces)

    @cached_property
    def slots(self) -> int:
        return max(g1 - g0 for g0, g1 in map(self.owned, range(self.world)))

    @property
    def code_bytes(self) -> int:
        return -(-self.ps // 8) * self.bits

    @property
    def nbytes(self) -> int:
        """Bytes each rank sends for this parameter."""
        return -(-(4 * self.slots + self.code_bytes) // 4) * 4

    def stock_nbytes(self, itemsize: int) -> int:
        """Bytes each rank sends for it on the stock gather of cast values (its ps-element slot)."""
        return self.ps * itemsize

    @cached_property
    def _scale_index(self) -> torch.Tensor:
        return torch.cat(
            [r * self.slots + torch.arange(g1 - g0) for r, (g0, g1) in enumerate(
                map(self.owned, range(self.world)))]
        )  # fmt: skip


def encode(fmt: WireFormat, rank: int, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 [fmt.nbytes]: rank's payload from the codes (uint8, one per member element it
    holds, members in flat order) and the fp32 scales of the groups it owns (same order)."""
    pieces = fmt.pieces(rank)
    g0, g1 = fmt.owned(rank)
    held, owned = sum(b - a for _, a, b, _ in pieces), g1 - g0
    if codes.numel() != held or scales.numel() != owned:
        raise ValueError(
            f"low-bit gather: rank {rank} holds {held} elements and {owned} scale groups, "
            f"got {codes.numel()} codes and {scales.numel()} scales"
        )
    out = torch.zeros(fmt.nbytes, dtype=torch.uint8, device=codes.device)
    out[: 4 * scales.numel()] = scales.float().contiguous().view(torch.uint8)
    padded = torch.zeros(fmt.code_bytes * 8 // fmt.bits, dtype=torch.uint8, device=codes.device)
    at, lo = 0, rank * fmt.ps
    for j, a, b, _ in (p for p in pieces if p[2] > p[1]):
        start = fmt.parts[j][0] + a - lo  # the piece's position in the rank's slot
        padded[start : start + b - a] = codes.reshape(-1)[at : at + b - a]
        at += b - a
    out[4 * fmt.slots : 4 * fmt.slots + fmt.code_bytes] = kernel_ops.pack(padded, fmt.bits)
    return out


def decode(fmt: WireFormat, chunks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[numel] in dtype: the parameter (the flat, 0 on padding) from every rank's payload,
    chunks uint8 [world, nbytes]."""
    head = chunks[:, : 4 * fmt.slots].contiguous().view(torch.float32).reshape(-1)
    scales = head[fmt._scale_index.to(head.device)]
    packed = chunks[:, 4 * fmt.slots : 4 * fmt.slots + fmt.code_bytes].contiguous()
    codes = kernel_ops.unpack(packed, fmt.bits)[:, : fmt.ps].reshape(-1)[: fmt.numel]
    if fmt.members is None:
        return _dequantize(fmt, codes.view(-1, fmt.group), scales, dtype).view(-1)
    out = torch.zeros(fmt.numel, dtype=dtype, device=chunks.device)
    at = 0
    for o, n, g in fmt.parts:
        s = scales[at : at + n // g]
        out[o : o + n] = _dequantize(fmt, codes[o : o + n].view(-1, g), s, dtype).view(-1)
        at += n // g
    return out


def _dequantize(
    fmt: WireFormat, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """cast((k - z) s) of codes [groups, G] with one scale per group."""
    if fmt.method == "quest":
        return kernel_ops.dequantize(codes, scales.view(-1, 1), fmt.bits, dtype)
    zero = 2 ** (fmt.bits - 1) - 1
    return ((codes.float() - zero) * scales.view(-1, 1)).to(dtype)
