"""Exact QuEST quantization of one rank's flat ZeRO partition, given the other ranks' halos.

For a quantized piece [a, b) of a parameter with rows of n elements and Hadamard block B:
  hull [ea, eb) = the piece widened to whole blocks; the missing elements [ea, a) and
  [b, eb) (the halo) come from the ranks that own them;
  s_row = sum of x^2 over the row: local for rows the piece holds whole (row_sumsq_ref, the
  single-process op), else the float64 sum, in rank order, of every owner's partial sum;
  y = ops.fwht(hull) per block (bit-identical to the unsharded rotation), D_row = grid_step(s_row),
  codes, values v = q(y), mask M, and Q(x) = ops.fwht(v) on the hull; the piece keeps its slice.
So values, mask and Q(x) equal the unsharded quantizer's wherever the row statistics agree
(always for whole rows; up to the float64-vs-float32 summation of cut rows).

Communication is split from compute so tests can drive every rank in one process:
``stats_payload(flat)`` is what this rank sends (float64: partial row sums of its cut rows,
then its elements in cut blocks); ``quantize(flat, gathered)`` takes every rank's payload
stacked [world, L] (padded). ``grad_payload`` / ``rotate_grad`` do the same for the STE
gradient (M ⊙ g) H, whose cut blocks need the neighbours' masked gradient.
RTN specs use the same machinery with absmax groups in place of blocks, no row statistics,
no rotation and an all-True mask (plain STE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from cage_kernels import ops
from cage_kernels.grid import grid_step
from cage_kernels.quest import quest_grid, row_sumsq_ref

from cage_ds.quant import QuantSpec

from .shardmap import PartitionMap, Piece


@dataclass(frozen=True)
class ShardQuant:
    """Per flat partition (length numel): ``values`` rotated q(x H) on quantized pieces,
    ``mask`` the STE mask (True elsewhere), ``error`` x - Q(x) (0 elsewhere); fp32/bool."""

    values: torch.Tensor
    mask: torch.Tensor
    error: torch.Tensor


@dataclass(frozen=True)
class _Send:
    """What one rank sends: cut-row partial sums, then elements of cut blocks."""

    rows: tuple[tuple[int, int, int, int], ...]  # (param, row, flat_lo, flat_hi)
    halo: tuple[tuple[int, int, int, int], ...]  # (param, elem_lo, elem_hi, flat_lo)

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def n_halo(self) -> int:
        return sum(hi - lo for _, lo, hi, _ in self.halo)


@dataclass
class _PiecePlan:
    piece: Piece
    hull: tuple[int, int]
    halo_pos: torch.Tensor  # positions in the hull filled from other ranks
    halo_rank: torch.Tensor  # per position: the rank that sends it
    halo_off: torch.Tensor  # per position: its offset in that rank's halo payload
    cut_rows: list[int]  # rows (absolute) whose sums come from the exchange
    cut_src: list[list[tuple[int, int]]]  # per cut row: (rank, row slot) in rank order


def send_of(
    pmap: PartitionMap, quantized: frozenset[int], block: int, row_stats: bool = True
) -> _Send:
    """What the rank of ``pmap`` sends per Q evaluation (payload layout, cost accounting):
    cut-row partial sums (QuEST only, ``row_stats``) and its elements in cut blocks/groups."""
    rows, halo = [], []
    for p in pmap.pieces:
        if p.param not in quantized:
            continue
        n = p.row_len
        for r in p.cut_rows() if row_stats else ():
            lo, hi = max(p.elem_start, r * n), min(p.elem_end, (r + 1) * n)
            rows.append(
                (p.param, r, p.flat_start + lo - p.elem_start, p.flat_start + hi - p.elem_start)
            )
        for lo, hi in p.partial_blocks(block):
            halo.append((p.param, lo, hi, p.flat_start + lo - p.elem_start))
    return _Send(tuple(rows), tuple(halo))


class ShardQuantizer:
    """QuEST of the quantized pieces of rank ``rank``'s partition (see module docstring).

    maps: every rank's segment table of this flat group; quantized: indices of the
    parameters that carry ``spec`` (others pass through: error 0, mask True, grad as is).
    """

    def __init__(
        self, maps: list[PartitionMap], rank: int, spec: QuantSpec, quantized: frozenset[int]
    ):
        self.spec, self.rank, self.world = spec, rank, len(maps)
        self.quest = spec.method == "quest"
        # the unit whose elements must sit together: a Hadamard block, or an RTN absmax group
        self.block = spec.hadamard_block if self.quest else spec.group_size
        self.map = maps[rank]
        self.quantized = quantized
        for p in self.map.pieces:
            if p.param in quantized:
                spec.check_row_len(p.row_len, f"parameter {p.param} of the flat group")
        self.sends = [send_of(m, quantized, self.block, self.quest) for m in maps]
        self._row_base = torch.tensor([s.n_rows for s in self.sends], dtype=torch.long)
        self.plans = [self._plan(p) for p in self.map.pieces if p.param in quantized]

    # ---- planning (pure python over the maps) ----
    def _owners(self, param: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """(rank, offset in its halo payload) for each element of [lo, hi) of ``param``."""
        out: list[tuple[int, int] | None] = [None] * (hi - lo)
        for r, send in enumerate(self.sends):
            if r == self.rank:
                continue
            off = 0
            for pj, c, d, _ in send.halo:
                if pj == param and c < hi and d > lo:
                    for e in range(max(c, lo), min(d, hi)):
                        out[e - lo] = (r, off + e - c)
                off += d - c
        missing = [lo + i for i, o in enumerate(out) if o is None]
        if missing:
            raise RuntimeError(
                f"halo of parameter {param}: no rank sends elements {missing[:4]}..."
            )
        return out  # type: ignore[return-value]

    def _plan(self, p: Piece) -> _PiecePlan:
        ea, eb = p.block_hull(self.block)
        pos = list(range(0, p.elem_start - ea)) + list(range(p.elem_end - ea, eb - ea))
        src = self._owners(p.param, ea, p.elem_start) + self._owners(p.param, p.elem_end, eb)
        cut_rows = p.cut_rows()
        cut_src = []
        for row in cut_rows:
            contrib = []
            for r, send in enumerate(self.sends):
                for slot, (pj, rr, _, _) in enumerate(send.rows):
                    if pj == p.param and rr == row:
                        contrib.append((r, slot))
            cut_src.append(contrib)
        return _PiecePlan(
            p,
            (ea, eb),
            torch.tensor(pos, dtype=torch.long),
            torch.tensor([r for r, _ in src], dtype=torch.long),
            torch.tensor([off for _, off in src], dtype=torch.long),
            cut_rows,
            cut_src,
        )

    def payload_sizes(self, with_rows: bool) -> list[int]:
        """Length of every rank's payload (float64 elements)."""
        return [(s.n_rows if with_rows else 0) + s.n_halo for s in self.sends]

    # ---- communication payloads ----
    def _halo_part(self, flat: torch.Tensor) -> torch.Tensor:
        mine = self.sends[self.rank]
        parts = [flat[f : f + hi - lo] for _, lo, hi, f in mine.halo]
        return torch.cat(parts).double() if parts else flat.new_zeros(0, dtype=torch.float64)

    def stats_payload(self, flat: torch.Tensor) -> torch.Tensor:
        """float64 [n_rows + n_halo]: partial sums of x^2 over my cut rows, my cut-block x."""
        mine = self.sends[self.rank]
        sums = [flat[lo:hi].double().square().sum() for _, _, lo, hi in mine.rows]
        rows = torch.stack(sums) if sums else flat.new_zeros(0, dtype=torch.float64)
        return torch.cat([rows, self._halo_part(flat)])

    def grad_payload(self, masked_grad: torch.Tensor) -> torch.Tensor:
        """float64 [n_halo]: my masked gradient in cut blocks."""
        return self._halo_part(masked_grad)

    # ---- compute ----
    def _hull(
        self, pl: _PiecePlan, flat: torch.Tensor, gathered: torch.Tensor, with_rows: bool
    ) -> torch.Tensor:
        p = pl.piece
        ea, eb = pl.hull
        hull = flat.new_empty(eb - ea, dtype=torch.float32)
        hull[p.elem_start - ea : p.elem_end - ea] = flat[p.flat_start : p.flat_start + p.length]
        if pl.halo_pos.numel():
            off = pl.halo_off + self._row_base[pl.halo_rank] if with_rows else pl.halo_off
            hull[pl.halo_pos] = gathered[pl.halo_rank, off].float()
        return hull

    def _row_sumsq(
        self, pl: _PiecePlan, flat: torch.Tensor, gathered: torch.Tensor
    ) -> torch.Tensor:
        """Sum of squares of every row the hull touches (float64 for cut rows), [rows, 1]."""
        p = pl.piece
        n = p.row_len
        rows = p.rows
        out = torch.empty(len(rows), 1, dtype=torch.float64, device=flat.device)
        first_full, end_full = -(-p.elem_start // n), p.elem_end // n
        if end_full > first_full:
            lo = p.flat_start + first_full * n - p.elem_start
            whole = flat[lo : lo + (end_full - first_full) * n].view(-1, n)
            out[first_full - rows.start : end_full - rows.start] = row_sumsq_ref(whole).double()
        for row, contrib in zip(pl.cut_rows, pl.cut_src, strict=True):
            total = torch.zeros((), dtype=torch.float64, device=flat.device)
            for r, slot in contrib:
                total = total + gathered[r, slot]
            out[row - rows.start, 0] = total
        return out

    def quantize(self, flat: torch.Tensor, gathered: torch.Tensor) -> ShardQuant:
        """Values, mask and error of my partition; ``gathered`` = all stats payloads [world, L]."""
        s, bb = self.spec, self.block
        values = torch.zeros(self.map.numel, dtype=torch.float32, device=flat.device)
        mask = torch.ones(self.map.numel, dtype=torch.bool, device=flat.device)
        error = torch.zeros(self.map.numel, dtype=torch.float32, device=flat.device)
        for pl in self.plans:
            p = pl.piece
            ea, eb = pl.hull
            hull = self._hull(pl, flat, gathered, with_rows=True)
            own = slice(p.elem_start - ea, p.elem_end - ea)
            dst = slice(p.flat_start, p.flat_start + p.length)
            if not self.quest:  # RTN: absmax per group, no rotation, plain STE (mask all True)
                v = ops.rtn_quantize(hull.view(-1, bb), s.bits, bb).values.view(-1)[own]
                values[dst] = v
                error[dst] = flat[dst].float() - v
                continue
            y = ops.fwht(hull.view(-1, bb), bb)
            block_row = (
                torch.div(
                    torch.arange(ea, eb, bb, device=flat.device), p.row_len, rounding_mode="floor"
                )
                - p.rows.start
            )
            step = grid_step(self._row_sumsq(pl, flat, gathered), p.row_len, s.bits)[block_row]
            _, v, m = quest_grid(y, step, s.bits, s.mask)
            values[dst] = v.view(-1)[own]
            mask[dst] = m.view(-1)[own]
            error[dst] = flat[dst].float() - ops.fwht(v, bb).view(-1)[own]
        return ShardQuant(values, mask, error)

    def masked_grad(self, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """M ⊙ g on quantized pieces, g elsewhere (mask is True there)."""
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype))

    def rotate_grad(self, masked: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        """(M ⊙ g) H on quantized pieces (halo from ``gathered`` grad payloads), g elsewhere."""
        if not self.quest:
            return masked.clone()
        bb = self.block
        out = masked.clone()
        for pl in self.plans:
            p = pl.piece
            ea = pl.hull[0]
            hull = self._hull(pl, masked, gathered, with_rows=False)
            rot = ops.fwht(hull.view(-1, bb), bb).view(-1)
            out[p.flat_start : p.flat_start + p.length] = rot[p.elem_start - ea : p.elem_end - ea]
        return out
