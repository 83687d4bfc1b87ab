"""Symmetric absmax round-to-nearest per group (the classic STE baseline).

For a group g of x: s = max|g| / (2^(b-1) - 1); k = clamp(round(g / s), -m, m) with
m = 2^(b-1) - 1; value = k * s; code = k + m in [0, 2^b - 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .grid import RMS_FLOOR


class RtnOut(NamedTuple):
    """values [..., n] (x.dtype), codes [..., n] uint8, scale [..., n // group] fp32."""

    values: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor


def rtn_quantize_ref(x: torch.Tensor, bits: int, group: int) -> RtnOut:
    """Absmax RTN of x [..., n] in groups of ``group`` along the last dim (n % group == 0)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"RTN bits must be an int in 2..8, got {bits!r}")
    n = x.shape[-1]
    if group < 1 or n % group:
        raise ValueError(f"RTN group {group} does not divide the row length {n}")
    m = 2 ** (bits - 1) - 1
    g = x.float().reshape(*x.shape[:-1], n // group, group)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(RMS_FLOOR) / m
    k = torch.round(g / scale).clamp_(-m, m) + 0.0  # -0 -> +0: the value is its code's
    values = (k * scale).reshape(x.shape).to(x.dtype)
    codes = (k + m).to(torch.uint8).reshape(x.shape)
    return RtnOut(values, codes, scale.squeeze(-1))
