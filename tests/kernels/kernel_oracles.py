"""Expected kernel outputs, composed from the torch twins with one documented difference.

torch.sqrt on CPU is not correctly rounded (it can be 1 ulp off, e.g. sqrt(6.8055840) gives
2.6087513 where IEEE gives 2.6087515); the kernels use sqrt_rn (IEEE, as torch on CUDA). So
the expected grid step is grid_step's formula with a correctly rounded square root (float64
sqrt rounded to fp32 is correctly rounded for fp32 inputs), and everything downstream
(codes, values, masks) comes from the twins' grid functions with that step: bit-identical.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from cage_kernels.grid import ALPHA, RMS_FLOOR, grid_codes, grid_values
from cage_kernels.hadamard import fwht_ref
from cage_kernels.sumsq import row_sumsq_tree_ref

U = 2.0**-24  # fp32 unit roundoff


def ieee_step(sumsq: torch.Tensor, row_len: int, bits: int) -> torch.Tensor:
    """grid_step with sqrt correctly rounded: [rows, 1] fp32."""
    ms = sumsq.float().reshape(-1, 1) / row_len
    rms = ms.double().sqrt().float().clamp_min(RMS_FLOOR)
    return 2.0 * (ALPHA[bits] * rms) / (2**bits - 1)


class Expected(NamedTuple):
    values: torch.Tensor
    codes: torch.Tensor
    step: torch.Tensor
    mask: torch.Tensor


def expected_quest(x, bits, block, sumsq=None, rule="trust", rotated=False, stats_of_y=False):
    """quest_quantize_ref's outputs with the IEEE step (sumsq None: tree statistics)."""
    y = (x if rotated else fwht_ref(x, block)).float()
    if sumsq is None:
        sumsq = row_sumsq_tree_ref(y if (rotated or stats_of_y) else x)
    step = ieee_step(sumsq, x.shape[-1], bits)
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
