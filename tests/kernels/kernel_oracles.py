"""Expected kernel outputs: the torch twins, and helpers to compare against them.

grid_step takes a correctly rounded square root (float64 sqrt rounded to fp32), as the
kernels' sqrt_rn; statistics are the fixed-order tree sums of sumsq.py; so codes, values and
masks must come out bit-identical.
"""

from __future__ import annotations

import torch
from cage_kernels.quest import QuestOut, quest_quantize_ref

U = 2.0**-24  # fp32 unit roundoff


def expected_quest(x, bits, block, sumsq=None, rule="trust", rotated=False) -> QuestOut:
    """The torch twin's outputs (sumsq None: tree statistics, as the kernels take)."""
    if sumsq is not None:
        sumsq = sumsq.reshape(-1, 1)
    return quest_quantize_ref(x, bits, block, sumsq, rule, rotated)


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
