"""QuEST quantization of rows (weights: one row per output feature; activations: per token).

For x [rows, n]: y = x (I ⊗ H_B); per-row sumsq s (of x, = of y since H is orthonormal);
D = grid_step(s); k = grid_codes(y, D); v = grid_values(k, D) is the rotated dequantized
value; trust mask M = |y - v| <= D/2 (QuEST), or clip mask M = |y| <= c.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .grid import check_bits, grid_codes, grid_step, grid_values
from .hadamard import fwht_ref
from .sumsq import row_sumsq_tree_ref


class QuestOut(NamedTuple):
    """Rotated-domain quantization of x [rows, n]: values [rows, n] (x.dtype), codes
    [rows, n] uint8 in [0, 2^b), step [rows, 1] fp32 (the scale: v = (k - (2^b-1)/2) * step),
    mask [rows, n] bool (the STE gradient mask)."""

    values: torch.Tensor
    codes: torch.Tensor
    step: torch.Tensor
    mask: torch.Tensor


def row_sumsq_ref(x: torch.Tensor) -> torch.Tensor:
    """s[r] = sum_j x[r, j]^2 in fp32, [rows, n] -> [rows, 1], in the fixed tree order of
    sumsq.row_sumsq_tree_ref that the kernels reproduce bit for bit."""
    return row_sumsq_tree_ref(x)


def quest_grid(
    y: torch.Tensor, step: torch.Tensor, bits: int, mask_rule: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotated y (fp32) on the grid of ``step`` (broadcast): (codes uint8, values fp32, mask).

    Trust mask M = |y - v| <= D/2 (QuEST); clip mask M = |y| <= c = D (2^b - 1) / 2.
    """
    codes = grid_codes(y, step, bits)
    values = grid_values(codes, step, bits)
    if mask_rule == "trust":
        mask = (y - values).abs() <= step * 0.5
    else:
        mask = y.abs() <= step * ((2**bits - 1) / 2.0)
    return codes, values, mask


def quest_quantize_ref(
    x: torch.Tensor,
    bits: int,
    block: int,
    sumsq: torch.Tensor | None = None,
    mask_rule: str = "trust",
    rotated: bool = False,
) -> QuestOut:
    """QuEST-quantize the rows of x [rows, n] in the rotated domain.

    sumsq [rows, 1] overrides the row statistics (e.g. summed across ranks when a row is
    split); rotated=True means x already holds y = x H.
    """
    check_bits(bits)
    if mask_rule not in ("trust", "clip"):
        raise ValueError(f"mask_rule must be 'trust' or 'clip', got {mask_rule!r}")
    y = (x if rotated else fwht_ref(x, block)).float()
    if sumsq is None:  # of x as given (with rotated=True, x is y): the tree view of x.dtype
        sumsq = row_sumsq_ref(x)
    step = grid_step(sumsq, x.shape[-1], bits)
    codes, values, mask = quest_grid(y, step, bits, mask_rule)
    return QuestOut(values.to(x.dtype), codes, step, mask)
