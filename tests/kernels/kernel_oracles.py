"""Expected kernel outputs, composed from the twins' grid functions step by step.

grid_step takes a correctly rounded square root (float64 sqrt rounded to fp32), as the
kernels' sqrt_rn; statistics are the fixed-order tree sums of sumsq.py; so codes, values and
masks must come out bit-identical.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from cage_kernels.grid import grid_codes, grid_step, grid_values
from cage_kernels.hadamard import fwht_ref
from cage_kernels.sumsq import row_sumsq_tree_ref

U = 2.0**-24  # fp32 unit roundoff


class Expected(NamedTuple):
    values: torch.Tensor
    codes: torch.Tensor
    step: torch.Tensor
    mask: torch.Tensor


def expected_quest(x, bits, block, sumsq=None, rule="trust", rotated=False):
    """quest_quantize_ref's outputs, recomposed (sumsq None: tree statistics)."""
    y = (x if rotated else fwht_ref(x, block)).float()
    if sumsq is None:
        sumsq = row_sumsq_tree_ref(y if rotated else x)
    step = grid_step(sumsq.reshape(-1, 1), x.shape[-1], bits)
    codes = grid_codes(y, step, bits)
    values = grid_values(codes, step, bits)
    if rule == "trust":
        mask = (y - values).abs() <= step * 0.5
    else:
        mask = y.abs() <= step * ((2**bits - 1) / 2.0)
    return Expected(values.to(x.dtype), codes, step, mask)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a bool / uint8 tensor (a poisoned 0xFF bool must not read as True)."""
    return t.contiguous().view(torch.uint8)


def assert_same(kernel, expected, fields=None) -> None:
    """torch.equal on every field (bools compared as raw bytes), naming the first mismatch."""
    for name, k, r in zip(expected._fields, kernel, expected, strict=True):
        if fields is not None and name not in fields:
            continue
        k = k.cpu()
        if r.dtype == torch.bool:
            k, r = as_bytes(k), as_bytes(r)
        assert k.dtype == r.dtype and k.shape == r.shape, f"{name}: {k.dtype}{k.shape} vs {r.shape}"
        assert torch.equal(k, r), f"{name}: {(k != r).sum().item()} of {r.numel()} differ"
