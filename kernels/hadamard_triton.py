"""Triton block Walsh-Hadamard rotation, optionally masked: y = (x ⊙ M) (I ⊗ H_B).

Twin: ``hadamard.fwht_ref`` (mask=None) and ``fwht_ref(x * mask)`` (the QuEST STE backward:
mask, then the inverse rotation, H^-1 = H). Tiles are [R, W] with W a power of two that
holds whole blocks (W = B .. 2048, aligned to blocks since B divides n); the butterfly
reproduces the reference bit-for-bit, low-precision input is rotated in fp32 and rounded
once to x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hadamard import check_block
from .quest_triton import rows_per_program
from .sumsq import next_pow2
from .triton_lib import cast_rne, fwht_tile, launch_opts, log2_exact


@triton.jit
def _fwht_kernel(
    x_ptr, mask_ptr, y_ptr, rows, n, hscale,
    R: tl.constexpr, W: tl.constexpr, LOG_B: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Tile (rows pid0*R.., columns pid1*W..): y = fwht(x * mask)."""
    r = (tl.program_id(0).to(tl.int64) * R + tl.arange(0, R))[:, None]
    c = (tl.program_id(1) * W + tl.arange(0, W))[None, :]
    inb = (r < rows) & (c < n)
    x = tl.load(x_ptr + r * n + c, mask=inb, other=0.0)
    xf = x.to(tl.float32)
    if HAS_MASK:
        xf = xf * tl.load(mask_ptr + r * n + c, mask=inb, other=0).to(tl.float32)
    y = fwht_tile(xf, R, W, LOG_B, hscale)
    tl.store(y_ptr + r * n + c, cast_rne(y, y_ptr.dtype.element_ty), mask=inb)


def fwht_triton(x: torch.Tensor, block: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., n] -> (x ⊙ mask) (I ⊗ H_block) in x.dtype; mask bool of x's shape or None."""
    n = x.shape[-1]
    check_block(block, n)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fwht kernel supports fp32/bf16/fp16, got {x.dtype}")
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    x2 = x.contiguous().view(-1, n)
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    if rows == 0:
        return y.view(x.shape)
    width = max(block, min(next_pow2(n), 2048))
    tile = rows_per_program(width, rows)
    m = mask.contiguous().view(-1, n).view(torch.uint8) if mask is not None else x2
    grid = (triton.cdiv(rows, tile), triton.cdiv(n, width))
    _fwht_kernel[grid](
        x2, m, y, rows, n, block**-0.5,
        R=tile, W=width, LOG_B=log2_exact(block, "block"), HAS_MASK=mask is not None,
        **launch_opts(tile * width),
    )  # fmt: skip
    return y.view(x.shape)
