"""Shard-aware CAGE ops for the flat ZeRO partitions a CageAdamW instance is handed.

``ShardedQuantOps`` is the TensorQuantOps of one flat fp32 partition (see
cage_ds/optim/quant_ops.py), computed on whole rows (rows.py: the runs a rank holds in
place, its cut rows assembled whole from their holders):
  fused_step   QuEST: one fused CAGE-AdamW kernel launch (cage_kernels.ops.
               cage_adamw_shard_step) over the runs and one over the cut rows, after one
               point-to-point exchange of the cut rows' (W, dL/dq, m, v); it also writes
               cast_lp(q(W H)) of the updated W into a low-precision copy of the partition
               that ``write_lp`` hands to the buffer DeepSpeed all-gathers, and its STE mask,
               which the next step's clipping mask (``mask``) reuses.
  error / ste_grad   the composed path (RTN weights): e = W - Q(W), g as is (plain STE).
  quantize     values, mask and error of the current W (lp writes after a checkpoint load,
               the clipping mask of RTN weights, telemetry); one exchange of W's cut rows.
Every rank computes the rows it touches exactly as the unsharded CageAdamW computes them.

Caches, keyed by the tensor's address and version counter: the last ``quantize`` (mask and
error; RTN's lp write at step t serves step t+1's error) and the lp copy and mask of the
last fused step. A fused step invalidates the quantization cache itself: Triton kernels
write in place without bumping the version counter. Every rank runs the same ops, so cache
hits agree.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from cage_kernels import ops as kernel_ops
from cage_kernels.segments import Segment, SegmentTable

from cage_ds.quant import Quantization, Quantizer, QuantSpec

from .rows import RowLayout, exchange_rows
from .shardmap import PartitionMap


class TensorState:
    """One tensor's contents at one moment: the same tensor object (a weak reference, never
    an address a freed tensor's successor can reuse) at the same in-place version."""

    def __init__(self, t: torch.Tensor) -> None:
        self._ref, self._version = weakref.ref(t), t._version

    def of(self, t: torch.Tensor) -> bool:
        return self._ref() is t and self._version == t._version


class ShardedQuantOps:
    """TensorQuantOps of one flat partition (module docstring); counts exchanged bytes.

    maps: every rank's segment table of this flat group, all of whose parameters carry
    ``spec``; lp_dtype: the dtype of the buffer DeepSpeed all-gathers.
    """

    def __init__(
        self,
        maps: list[PartitionMap],
        rank: int,
        spec: QuantSpec,
        lp_dtype: torch.dtype,
        group: Any = None,
        name: str = "partition",
        param_names: tuple[str, ...] = (),
    ):
        for p in maps[rank].pieces:
            spec.check_row_len(p.row_len, f"{name}: parameter {p.param}")
        self.quantizer = Quantizer(spec)
        quest = spec.method == "quest"
        self.layout = RowLayout(maps, rank, spec.bits, ste=quest)
        self.tables = None
        if quest:
            self.tables = tuple(
                SegmentTable(segs, spec.hadamard_block, spec.mask)
                for segs in (self.layout.runs, self.layout.side_segments)
            )
        self._side_at = {(s.param_id, s.param_offset // s.row_len): s
                         for s in self.layout.side_segments}  # fmt: skip
        self.lp_dtype, self.group, self.name = lp_dtype, group, name
        self.param_names = param_names  # name of flat-group parameter j (telemetry keys)
        self._slots = sorted({p.param for m in maps for p in m.pieces})
        self._cache: tuple[TensorState, Quantization, Quantization, torch.Tensor] | None = None
        self._lp: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._side_mask: torch.Tensor | None = None  # the cut rows' masks, whole rows
        self._side_w: torch.Tensor | None = None  # the cut rows of the fused step's new W
        self._lp_of: TensorState | None = None
        self.steps_on_kept_masks = 0
        self.exchanges = 0
        self.bytes_received = 0
        self.elements_quantized = 0

    def __repr__(self) -> str:
        lay = self.layout
        return f"ShardedQuantOps({self.name}, rank {lay.rank}/{lay.world})"

    @property
    def numel(self) -> int:
        return self.layout.map.numel

    def _check(self, w: torch.Tensor) -> None:
        if w.dim() != 1 or w.numel() != self.numel:
            raise ValueError(
                f"{self.name}: expected the flat partition of {self.numel} elements, "
                f"got shape {tuple(w.shape)}"
            )

    def _exchange(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        side, received = exchange_rows(self.layout, tensors, self.group)
        if self.layout.peers:
            self.exchanges += 1
            self.bytes_received += received
        return side

    def _count_quantized(self) -> None:
        self.elements_quantized += self.layout.run_numel + self.layout.side_numel

    def _rows(self, t: torch.Tensor, segs: tuple[Segment, ...]) -> list[torch.Tensor]:
        return [t[s.shard_start : s.shard_start + s.numel].view(s.n_rows, s.row_len) for s in segs]

    # ---- the fused step (QuEST) ----
    def fused_step(
        self, w: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
        **hyper: Any,
    ) -> bool:  # fmt: skip
        """One CAGE-AdamW step of the partition in place (hyper: cage_adamw_shard_step's
        keywords), g = dL/dq of the gathered q(W H); False (nothing done) for RTN.

        The step writes the STE mask of the new W for its runs and whole cut rows; when the
        next step finds W unchanged, it passes those masks back in (mask_in), so the STE does
        not quantize W again. Every holder of a cut row computed the same whole row, so the
        kept side mask is that of the row the next exchange assembles."""
        if self.tables is None:
            return False
        self._check(w)
        runs, cut = self.tables
        side = self._exchange([w, g, exp_avg, exp_avg_sq])
        self._count_quantized()
        kept = self._fused_of(w)
        if self._lp is None or self._lp.device != w.device:
            self._lp = torch.zeros(self.numel, dtype=self.lp_dtype, device=w.device)
            self._mask = torch.ones(self.numel, dtype=torch.bool, device=w.device)  # padding: 1
            self._side_mask = torch.empty(self.layout.side_numel, dtype=torch.bool,
                                          device=w.device)  # fmt: skip
            kept = False
        self._cache = None
        if kept:
            self.steps_on_kept_masks += 1
        if runs.segments:
            kernel_ops.cage_adamw_shard_step(
                w, g, exp_avg, exp_avg_sq, runs, qout=self._lp, mask_out=self._mask,
                mask_in=self._mask if kept else None, **hyper,
            )  # fmt: skip
        if cut.segments:
            side_q = side.new_empty(1, self.layout.side_numel, dtype=self.lp_dtype)
            kernel_ops.cage_adamw_shard_step(
                *side, cut, qout=side_q[0], mask_out=self._side_mask,
                mask_in=self._side_mask if kept else None, **hyper,
            )  # fmt: skip
            self.layout.scatter(side[[0, 2, 3]], [w, exp_avg, exp_avg_sq])
            self.layout.scatter(side_q, [self._lp])
            self.layout.scatter(self._side_mask[None], [self._mask])
        self._side_w = side[0]
        self._lp_of = TensorState(w)
        return True

    # ---- quantization of the current W ----
    def _evaluate(self, t: torch.Tensor, segs: tuple[Segment, ...]) -> Quantization:
        """Quantizer.evaluate of every segment's rows of t, fields flattened and concatenated."""
        qs = [self.quantizer.evaluate(r) for r in self._rows(t, segs)]
        if not qs:
            empty = t.new_zeros(0)
            return Quantization(empty, empty.bool(), empty)
        fields = zip(*qs, strict=True)  # (values...), (masks...), (errors...)
        return Quantization(*(torch.cat([f.reshape(-1) for f in parts]) for parts in fields))

    def quantize(self, w: torch.Tensor) -> Quantization:
        """Values, mask, error of the partition w, [numel] each (values / error 0 and mask
        True on padding); one exchange; refreshes the cache."""
        self._check(w)
        side = self._exchange([w])
        self._count_quantized()
        full = Quantization(torch.zeros_like(w), torch.ones_like(w, dtype=torch.bool),
                            torch.zeros_like(w))  # fmt: skip
        runs, at = self._evaluate(w, self.layout.runs), 0
        for s in self.layout.runs:
            for out, part in zip(full, runs, strict=True):
                out[s.shard_start : s.shard_start + s.numel] = part[at : at + s.numel]
            at += s.numel
        cut = self._evaluate(side[0], self.layout.side_segments)  # side rows are back to back
        for out, part in zip(full, cut, strict=True):
            self.layout.scatter(part[None], [out])
        self._cache = (TensorState(w), full, cut, side[0])
        return full

    def _side_rows(self, w: torch.Tensor) -> torch.Tensor:
        """The cut rows of w, whole and back to back (side_segments): kept from the last fused
        step or exchange of this w, else one exchange."""
        if self._fused_of(w):
            return self._side_w
        if self._cache is None or not self._cache[0].of(w):
            self.quantize(w)
        return self._cache[3]

    def _cached(self, w: torch.Tensor) -> tuple[Quantization, Quantization]:
        if self._cache is None or not self._cache[0].of(w):
            self.quantize(w)
        return self._cache[1], self._cache[2]

    def invalidate(self) -> None:
        """Forget cached quantizations and the lp copy (the master was rewritten outside)."""
        self._cache = self._lp_of = None

    def _fused_of(self, w: torch.Tensor) -> bool:
        """Whether the last fused step's lp copy and mask are those of this w."""
        return self._lp_of is not None and self._lp_of.of(w)

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """The STE mask M of q(w H) (True on padding): the last fused step's, when of this w."""
        self._check(w)
        return self._mask if self._fused_of(w) else self._cached(w)[0].mask

    @torch.no_grad()
    def mask_grads_(self, w: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """grads (consecutive pieces of w's flat gradient, in order) <- M ⊙ grads, in place."""
        mask, off = self.mask(w), 0
        for g in grads:
            n = g.numel()
            if off + n > mask.numel():
                raise RuntimeError(f"{self.name}: gradient pieces exceed {mask.numel()} elements")
            g.mul_(mask[off : off + n].to(g.dtype).view(g.shape))
            off += n

    def error(self, w: torch.Tensor) -> torch.Tensor:
        """e = w - Q(w) on the parameters' elements, 0 on padding."""
        self._check(w)
        return self._cached(w)[0].error

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """dL/dw = (M ⊙ dL/dq) H from the rotated-domain gradient g of the gathered q(w H)
        (RTN: g, plain STE); one exchange of g's cut rows."""
        self._check(w)
        if self.tables is None:
            return g
        full, side_q = self._cached(w)
        block = self.quantizer.spec.hadamard_block
        out = torch.where(full.mask, g, torch.zeros((), dtype=g.dtype))
        for rows in self._rows(out, self.layout.runs):
            rows.copy_(kernel_ops.fwht(rows, block))
        side = self._exchange([g])[0] * side_q.mask
        rot = [kernel_ops.fwht(r, block) for r in self._rows(side, self.layout.side_segments)]
        if rot:
            self.layout.scatter(torch.cat(rot, 1), [out])
        return out

    @torch.no_grad()
    def piece_sums(self, w: torch.Tensor) -> torch.Tensor:
        """float64 [len(slots), 4]: this rank's share of (sum e^2, sum w^2, masked entries,
        entries) of every parameter of the group, rows in ``slots()`` order, from the cached
        quantization of w (a fresh one, collective, if w changed since)."""
        self._check(w)
        q = self._cached(w)[0]
        slot = {j: i for i, j in enumerate(self.slots())}
        out = torch.zeros(len(slot), 4, dtype=torch.float64, device=w.device)
        for p in self.layout.map.pieces:
            sl = slice(p.flat_start, p.flat_start + p.length)
            row = out[slot[p.param]]
            row[0] += q.error[sl].double().square().sum()
            row[1] += w[sl].double().square().sum()
            row[2] += (~q.mask[sl]).sum()
            row[3] += p.length
        return out

    def slots(self) -> list[int]:
        """Indices (in the flat group) of the parameters, ascending: the same list on every
        rank, whichever pieces this rank holds."""
        return list(self._slots)

    @torch.no_grad()
    def wire_parts(self, w: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{parameter j: (codes uint8 of the elements of j this rank holds, fp32 scales of
        the scale groups (QuEST: rows; RTN: groups) whose first element it holds)} of q(w H),
        the integer form of write_lp's values (cage_ds.quant.lowbit), from whole rows."""
        self._check(w)
        side = self._side_rows(w)
        spec = self.quantizer.spec
        out = {}
        for p in self.layout.map.pieces:
            n = p.row_len
            r0, r1 = p.elem_start // n, -(-p.elem_end // n)
            whole0, whole1 = -(-p.elem_start // n), p.elem_end // n
            head = whole0 > r0  # the first row is cut (its start lies before the piece)
            rows = [self._side_row(side, p.param, r0)] if head else []
            if whole1 > whole0:
                start = p.flat_start + whole0 * n - p.elem_start
                rows.append(w[start : start + (whole1 - whole0) * n].view(-1, n))
            if whole1 < r1 and not (head and r1 - 1 == r0):  # the last row is cut
                rows.append(self._side_row(side, p.param, r1 - 1))
            q = self.quantizer.quantize(torch.cat(rows))
            group = n if spec.method == "quest" else spec.group_size
            base = r0 * (n // group)
            g0, g1 = -(-p.elem_start // group), -(-p.elem_end // group)
            codes = q.codes.reshape(-1)[p.elem_start - r0 * n : p.elem_end - r0 * n]
            out[p.param] = (codes, q.scales.reshape(-1)[g0 - base : g1 - base])
        return out

    def _side_row(self, side: torch.Tensor, param: int, row: int) -> torch.Tensor:
        """Cut row ``row`` of parameter ``param`` as [1, row_len] from the side buffer."""
        seg = self._side_at[(param, row)]
        return side[seg.shard_start : seg.shard_start + seg.row_len].view(1, -1)

    @torch.no_grad()
    def write_lp(self, w: torch.Tensor, lp: torch.Tensor) -> None:
        """lp[parameter elements] = cast(q(w H)): the fused step's copy when it is of this w,
        else a fresh quantization; lp's padding is left as DeepSpeed wrote it."""
        self._check(w)
        fresh = self._fused_of(w) and self._lp.dtype == lp.dtype
        values = self._lp if fresh else self.quantize(w).values
        for p in self.layout.map.pieces:
            sl = slice(p.flat_start, p.flat_start + p.length)
            lp[sl].copy_(values[sl])


def install_quant_ops(
    optimizer: torch.optim.Optimizer, registry: dict[int, ShardedQuantOps]
) -> None:
    """Make ``optimizer.quant_ops(group, p)`` return registry[id(p)] for flat partitions
    (CageAdamW.set_quant_ops).

    Groups without "quant" keep returning None; a quantized group's tensor that is not a
    registered partition is an error (it would be quantized as if it were a whole weight).
    """
    if not callable(getattr(optimizer, "set_quant_ops", None)):
        raise TypeError(
            f"cage_ds.zero needs an optimizer with the set_quant_ops seam (CageAdamW), "
            f"got {type(optimizer).__name__}"
        )

    def quant_ops(group: dict, p: torch.Tensor) -> ShardedQuantOps | None:
        ops = registry.get(id(p))
        if ops is not None:
            return ops
        if group.get("quant") is None:
            return None
        raise RuntimeError(
            f"cage_ds.zero: a tensor of shape {tuple(p.shape)} in a quantized param group is "
            "not a registered ZeRO partition"
        )

    optimizer.set_quant_ops(quant_ops)
