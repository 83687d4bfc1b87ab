"""Torch twin of the fused CAGE-AdamW shard step (the reference of cage_adamw_triton).

Per segment of the SegmentTable, on its rows W [n_rows, row_len] (views into the flat shard):
    if ste:      g <- fwht((M(W) ⊙ g)),   M the trust / clip mask of q(W H) (old W), or
                 mask_in when given (the previous step's mask_out of this W)
    Q(W) = fwht(q(fwht(W))),  q with row statistics row_sumsq_tree_ref(W)  (bits > 0 only)
    then ``adamw_update.cage_adamw_update`` (the same update cage_ds.optim.CageAdamW runs)
    qout <- q(W H) values (bits > 0) or W, cast to qout.dtype    (the gathered low-precision copy)
    mask_out <- the STE mask of that q(W H) (True for bits = 0)  (the next step's mask)
``quest_shard_quantize_ref`` is the qout part alone (the copy of the current W, no update).
"""

from __future__ import annotations

import torch

from .adamw_update import cage_adamw_update
from .hadamard import fwht_ref
from .quest import quest_quantize_ref
from .segments import SegmentTable
from .sumsq import row_sumsq_tree_ref


def quest_rows_ref(w: torch.Tensor, bits: int, block: int, mask_rule: str):
    """QuEST of rows w with the tree row statistics (what the kernel computes in registers)."""
    return quest_quantize_ref(w, bits, block, row_sumsq_tree_ref(w), mask_rule)


def cage_adamw_shard_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    lam: float,
    variant: str,
    qout: torch.Tensor | None = None,
    mask_out: torch.Tensor | None = None,
    mask_in: torch.Tensor | None = None,
) -> None:
    """One step over every segment of a flat fp32 shard, in place (module docstring)."""
    shard = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in shard.items():
        table.check_shard(t.numel(), name)
    block, rule = table.block, table.mask_rule
    for seg in table.segments:
        span = slice(seg.shard_start, seg.shard_start + seg.numel)

        def rows(t: torch.Tensor, seg=seg, span=span) -> torch.Tensor:
            return t[span].view(seg.n_rows, seg.row_len)

        w, g = rows(param), rows(grad)
        error_fn = None
        if seg.bits:
            if seg.ste:
                mask = quest_rows_ref(w, seg.bits, block, rule).mask if mask_in is None else None
                g = fwht_ref(g * (rows(mask_in) if mask is None else mask), block)

            def error_fn(x: torch.Tensor, bits=seg.bits) -> torch.Tensor:
                return x - fwht_ref(quest_rows_ref(x, bits, block, rule).values, block)

        cage_adamw_update(
            w, g, rows(exp_avg), rows(exp_avg_sq), step=step, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, lam=lam, variant=variant, error_fn=error_fn,
        )  # fmt: skip
    if qout is not None or mask_out is not None:
        quest_shard_quantize_ref(param, table, qout, mask_out)


def quest_shard_quantize_ref(
    param: torch.Tensor,
    table: SegmentTable,
    qout: torch.Tensor | None,
    mask_out: torch.Tensor | None = None,
) -> None:
    """qout <- q(W H) values (bits > 0) or W, cast to qout.dtype, and mask_out <- its STE
    mask (True for bits = 0), for every segment's rows: the low-precision copy of the current
    latent shard (e.g. after a checkpoint load)."""
    table.check_shard(param.numel(), "param")
    for seg in table.segments:
        span = slice(seg.shard_start, seg.shard_start + seg.numel)
        w = param[span].view(seg.n_rows, seg.row_len)
        out = quest_rows_ref(w, seg.bits, table.block, table.mask_rule) if seg.bits else None
        if qout is not None:
            qout[span].view_as(w).copy_(w if out is None else out.values)
        if mask_out is not None:
            mask_out[span].view_as(w).copy_(True if out is None else out.mask)
