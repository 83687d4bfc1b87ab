"""Triton dequantization: codes + per-row step -> rotated values (k - (2^b-1)/2) step in a dtype.

Twin: ``grid.grid_values(codes, step, bits).to(dtype)``. Tiles [R, W] over a 2-D grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import check_bits
from .quest_triton import rows_per_program
from .sumsq import next_pow2
from .triton_lib import cast_rne, launch_opts


@triton.jit
def _dequant_kernel(codes_ptr, step_ptr, out_ptr, rows, n, half,
                    R: tl.constexpr, W: tl.constexpr):  # fmt: skip
    """out[r, j] = (codes[r, j] - half) * step[r]."""
    r1 = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    r = r1[:, None]
    c = (tl.program_id(1) * W + tl.arange(0, W))[None, :]
    inb = (r < rows) & (c < n)
    k = tl.load(codes_ptr + r * n + c, mask=inb, other=0).to(tl.float32)
    step = tl.load(step_ptr + r1, mask=r1 < rows, other=0.0)[:, None]
    v = (k - half) * step
    tl.store(out_ptr + r * n + c, cast_rne(v, out_ptr.dtype.element_ty), mask=inb)


def dequantize_triton(
    codes: torch.Tensor, step: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes uint8 [rows, n], step fp32 [rows, 1] -> values [rows, n] in dtype."""
    check_bits(bits)
    if codes.dim() != 2 or step.numel() != codes.shape[0]:
        raise ValueError(
            f"dequantize expects codes [rows, n] and step [rows, 1], got {tuple(codes.shape)} "
            f"and {tuple(step.shape)}"
        )
    rows, n = codes.shape
    out = torch.empty(rows, n, dtype=dtype, device=codes.device)
    if codes.numel():
        width = min(next_pow2(n), 2048)
        tile = rows_per_program(width, rows)
        grid = (triton.cdiv(rows, tile), triton.cdiv(n, width))
        step = step.float().contiguous().view(-1)
        _dequant_kernel[grid](codes.contiguous(), step, out, rows, n, (2**bits - 1) / 2.0,
                              R=tile, W=width, **launch_opts(tile * width))  # fmt: skip
    return out
