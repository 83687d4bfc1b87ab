"""Shard-aware CAGE ops for the flat ZeRO partitions a CageAdamW instance is handed.

``ShardedQuantOps`` is the TensorQuantOps of one flat fp32 partition (see
cage_ds/optim/quant_ops.py): error(w) = w - Q(w) and ste_grad(w, g) = (M ⊙ g) H, with the
quantization of each piece made exact by one all-gather of every rank's cut-row partial
sums and cut-block elements (sharded_quest.py). ``lp_values(w)`` gives q(w H), which the
engine hooks write into the low-precision partition that DeepSpeed all-gathers.

Cache: the last quantization (mask and error) is kept with the tensor's version counter,
so the lp write at the end of step t serves step t+1's STE mask and coupled error without
another exchange. Every rank runs the same in-place ops, so cache hits agree across ranks.
``piece_sums`` reads the same cache for telemetry (cage_ds/zero/stats.py).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as tdist

from .sharded_quest import ShardQuant, ShardQuantizer


def all_gather_padded(payload: torch.Tensor, sizes: list[int], group: Any = None) -> torch.Tensor:
    """Stack every rank's 1-D float64 payload (lengths ``sizes``) into [world, max(sizes)]."""
    width = max(1, max(sizes))
    mine = torch.zeros(width, dtype=torch.float64, device=payload.device)
    mine[: payload.numel()] = payload
    if len(sizes) == 1:
        return mine.unsqueeze(0)
    out = [torch.empty_like(mine) for _ in sizes]
    tdist.all_gather(out, mine, group=group)
    return torch.stack(out)


class ShardedQuantOps:
    """TensorQuantOps of one flat partition (see module docstring); counts exchanged bytes."""

    def __init__(
        self,
        quantizer: ShardQuantizer,
        group: Any = None,
        name: str = "partition",
        param_names: tuple[str, ...] = (),
    ):
        self.quantizer = quantizer
        self.group = group
        self.name = name
        self.param_names = param_names  # name of flat-group parameter j (telemetry keys)
        self._stats_sizes = quantizer.payload_sizes(with_rows=True)
        self._halo_sizes = quantizer.payload_sizes(with_rows=False)
        self._cache: tuple[int, int, torch.Tensor, torch.Tensor] | None = None
        self.exchanges = 0
        self.bytes_received = 0
        self.elements_quantized = 0

    def __repr__(self) -> str:
        return f"ShardedQuantOps({self.name}, rank {self.quantizer.rank}/{self.quantizer.world})"

    def _check(self, w: torch.Tensor) -> None:
        if w.dim() != 1 or w.numel() != self.quantizer.map.numel:
            raise ValueError(
                f"{self.name}: expected the flat partition of {self.quantizer.map.numel} elements, "
                f"got shape {tuple(w.shape)}"
            )

    def _exchange(self, payload: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        gathered = all_gather_padded(payload, sizes, self.group)
        self.exchanges += 1
        self.bytes_received += gathered.numel() * gathered.element_size()
        return gathered

    def quantize(self, w: torch.Tensor) -> ShardQuant:
        """Fresh exact quantization of the partition w (one all-gather); refreshes the cache."""
        self._check(w)
        q = self.quantizer
        out = q.quantize(w, self._exchange(q.stats_payload(w), self._stats_sizes))
        self.elements_quantized += sum(pl.hull[1] - pl.hull[0] for pl in q.plans)
        self._cache = (w.data_ptr(), w._version, out.mask, out.error)
        return out

    def _cached(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if c is None or c[0] != w.data_ptr() or c[1] != w._version:
            out = self.quantize(w)
            return out.mask, out.error
        return c[2], c[3]

    def invalidate(self) -> None:
        """Forget the cached quantization (after the master was rewritten from outside)."""
        self._cache = None

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """The STE mask M of q(w H) (True on padding and unquantized pieces)."""
        self._check(w)
        return self._cached(w)[0]

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
        """e = w - Q(w) on quantized pieces, 0 on padding and unquantized pieces."""
        self._check(w)
        return self._cached(w)[1].to(w.dtype)

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """dL/dw = (M ⊙ dL/dq) H from the rotated-domain gradient g of the gathered q(w H)."""
        self._check(w)
        q = self.quantizer
        if not q.quest:  # RTN: plain STE in the original domain
            return g
        mask = self._cached(w)[0]
        masked = q.masked_grad(g, mask)
        gathered = self._exchange(q.grad_payload(masked), self._halo_sizes)
        return q.rotate_grad(masked, gathered).to(g.dtype)

    @torch.no_grad()
    def piece_sums(self, w: torch.Tensor) -> torch.Tensor:
        """float64 [len(slots), 4]: this rank's share of (sum e^2, sum w^2, masked entries,
        entries) of every quantized parameter of the group, rows in ``slots()`` order, from
        the cached quantization of w (a fresh one, collective, if w changed since)."""
        self._check(w)
        mask, error = self._cached(w)
        slot = {j: i for i, j in enumerate(self.slots())}
        out = torch.zeros(len(slot), 4, dtype=torch.float64, device=w.device)
        for pl in self.quantizer.plans:
            p = pl.piece
            sl = slice(p.flat_start, p.flat_start + p.length)
            row = out[slot[p.param]]
            row[0] += error[sl].double().square().sum()
            row[1] += w[sl].double().square().sum()
            row[2] += (~mask[sl]).sum()
            row[3] += p.length
        return out

    def slots(self) -> list[int]:
        """Indices (in the flat group) of the quantized parameters, ascending: the same list
        on every rank, whichever pieces this rank holds."""
        return sorted(self.quantizer.quantized)

    @torch.no_grad()
    def write_lp(self, w: torch.Tensor, lp: torch.Tensor) -> None:
        """lp[quantized pieces] = cast(q(w H)); the rest of lp is left as DeepSpeed wrote it."""
        out = self.quantize(w)
        for pl in self.quantizer.plans:
            p = pl.piece
            sl = slice(p.flat_start, p.flat_start + p.length)
            lp[sl].copy_(out.values[sl])


def install_quant_ops(
    optimizer: torch.optim.Optimizer, registry: dict[int, ShardedQuantOps]
) -> None:
    """Make ``optimizer.quant_ops(group, p)`` return registry[id(p)] for flat partitions.

    Groups without "quant" keep returning None; a quantized group's tensor that is not a
    registered partition is an error (it would be quantized as if it were a whole weight).
    """
    if not callable(getattr(optimizer, "quant_ops", None)):
        raise TypeError(
            f"cage_ds.zero needs an optimizer with the quant_ops(group, p) hook (CageAdamW), "
            f"got {type(optimizer).__name__}"
        )

    def quant_ops(self, group: dict, p: torch.Tensor):
        ops = registry.get(id(p))
        if ops is not None:
            return ops
        if group.get("quant") is None:
            return None
        raise RuntimeError(
            f"cage_ds.zero: a tensor of shape {tuple(p.shape)} in a quantized param group is "
            "not a registered ZeRO partition"
        )

    optimizer.quant_ops = types.MethodType(quant_ops, optimizer)
    optimizer.cage_zero_ops = registry
