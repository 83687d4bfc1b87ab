"""Triton QuEST row quantization (weights per output row, activations per token), one pass.

Kernel ``_quest_rows_kernel`` holds a tile of R whole rows [R, N] (N = next power of two
>= n, zero-padded, padding never loaded) and writes, from one read of x:
  values [rows, n] x.dtype   rotated dequantized q(x H)
  codes  uint8 [rows, n]  or packed b-bit fields [rows, n b / 8]   (PACK)
  step   fp32 [rows]          the scale: v = (k - (2^b-1)/2) step
  mask   bool [rows, n]   or packed bits [rows, n / 8]  (trust or clip STE mask)
Twin: ``quest.quest_quantize_ref`` (and ``quest_packed.quest_quantize_packed_ref``).

Every load and store addresses the tile through one offset tensor capped at one 16-byte
access per thread (VEC elements): otherwise the uint8 code and mask stores take a wider
register layout than the values store and the compiler computes the grid once per layout
(tests/kernels/sm90_compile.py counts such duplicates).

Row statistics: a given ``sumsq`` [rows, 1] is used as is (bit-identical to the reference
given the same sumsq). Without one the kernel computes the fixed-order tree sum
(``sumsq.row_sumsq_tree_ref``), which can differ from torch.sum by a few ulps: step then
matches grid_step(row_sumsq_tree_ref(x)) exactly, and the reference within that ulp bound.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .grid import ALPHA, check_bits
from .hadamard import check_block
from .quest import QuestOut
from .quest_packed import QuestPacked
from .sumsq import next_pow2
from .triton_lib import (
    CLIP,
    TRUST,
    cast_rne,
    fwht_tile,
    launch_opts,
    log2_exact,
    pack_rows_store,
    quest_grid,
    quest_step,
    reduction_rows,
    tree_opts,
    tree_row_sum,
)

STATS_GIVEN, STATS_OF_X, STATS_OF_Y = 0, 1, 2


@triton.jit
def _quest_rows_kernel(
    x_ptr, sumsq_ptr, values_ptr, codes_ptr, step_ptr, mask_ptr,
    rows, n, alpha, hscale, levels_m1,
    R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_W: tl.constexpr,
    LOG_L: tl.constexpr, LOG_V: tl.constexpr,
    LOG_B: tl.constexpr, VEC: tl.constexpr, BITS: tl.constexpr, ROTATE: tl.constexpr,
    STATS: tl.constexpr, MASK_RULE: tl.constexpr, PACK: tl.constexpr, WRITE_CODES: tl.constexpr,
):  # fmt: skip
    """One tile of R rows: y = x H (rounded to x.dtype, as fwht_ref), step, codes, values, mask."""
    r1 = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    r = r1[:, None]
    c = tl.arange(0, N)[None, :]
    in_rows = r1 < rows
    inb = (r < rows) & (c < n)
    offs = tl.max_contiguous(r * n + c, [1, VEC])  # one register layout for every store
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    xf = x.to(tl.float32)
    if ROTATE:
        y = cast_rne(fwht_tile(xf, R, N, LOG_B, hscale), x.dtype).to(tl.float32)
    else:
        y = xf
    if STATS == 0:
        s = tl.load(sumsq_ptr + r1, mask=in_rows, other=1.0)
    elif STATS == 1:
        s = tree_row_sum(xf * xf, R, N, LOG_N, LOG_W, LOG_L, LOG_V)
    else:
        s = tree_row_sum(y * y, R, N, LOG_N, LOG_W, LOG_L, LOG_V)
    # tl.cast, not n.to: a GPU launch specialises n == 1 into a Python int constant.
    step1 = quest_step(s, tl.cast(n, tl.float32), alpha, levels_m1)
    step = step1[:, None]
    k, v, m = quest_grid(y, step, levels_m1, MASK_RULE)
    tl.store(values_ptr + offs, cast_rne(v, values_ptr.dtype.element_ty), mask=inb)
    tl.store(step_ptr + r1, step1, mask=in_rows)
    if PACK:
        groups = (r < rows) & (tl.arange(0, N // 8)[None, :] < n // 8)
        pack_rows_store(k.to(tl.int32), codes_ptr, r * (n // 8) * BITS, groups, R, N, BITS)
        pack_rows_store(m.to(tl.int32), mask_ptr, r * (n // 8), groups, R, N, 1)
    else:
        if WRITE_CODES:
            tl.store(codes_ptr + offs, k.to(tl.uint8), mask=inb)
        tl.store(mask_ptr + offs, m.to(tl.uint8), mask=inb)


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def rows_per_program(width: int, rows: int) -> int:
    """Rows per tile: ~32K elements under the interpreter (2 ms per program, so capped at
    the rows there are), ~4K compiled (fixed per width: one compiled variant per width)."""
    if interpreting():
        return max(1, min((1 << 15) // width, next_pow2(rows)))
    return max(1, (1 << 12) // width)


def _check_rows(x: torch.Tensor, bits: int, block: int, mask_rule: str) -> None:
    check_bits(bits)
    if x.dim() != 2:
        raise ValueError(f"quest kernel expects x [rows, n], got shape {tuple(x.shape)}")
    check_block(block, x.shape[1])
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quest kernel supports fp32/bf16/fp16, got {x.dtype}")
    if mask_rule not in ("trust", "clip"):
        raise ValueError(f"mask_rule must be 'trust' or 'clip', got {mask_rule!r}")


def _launch(x, bits, block, sumsq, mask_rule, rotated, values, codes, step,
            mask, pack, write_codes=True, vec=None):  # fmt: skip
    """vec: contiguous elements per access of every load and store; default one 16-byte
    access of x, which puts all stores in x's register layout (a wider vec lets the u8
    stores ask for a second layout, and the compiler then recomputes the grid in it)."""
    rows, n = x.shape
    width = max(next_pow2(n), 8)
    tile = reduction_rows(rows_per_program(width, rows))
    if sumsq is not None:
        if sumsq.numel() != rows:
            raise ValueError(f"sumsq must hold one value per row ({rows}), got {sumsq.numel()}")
        sumsq = sumsq.reshape(rows).float().contiguous()
        stats = STATS_GIVEN
    else:
        stats = STATS_OF_Y if rotated else STATS_OF_X
    _quest_rows_kernel[(triton.cdiv(rows, tile),)](
        x, sumsq if sumsq is not None else step, values, codes if write_codes else mask, step, mask,
        rows, n, ALPHA[bits], block**-0.5, float(2**bits - 1),
        R=tile, N=width, LOG_N=log2_exact(width, "row width"), **tree_opts(width, x.element_size()),
        LOG_B=log2_exact(block, "block"), VEC=vec or 16 // x.element_size(),
        BITS=bits if pack else 0, ROTATE=not rotated, STATS=stats,
        MASK_RULE=TRUST if mask_rule == "trust" else CLIP, PACK=pack, WRITE_CODES=write_codes,
        **launch_opts(tile * width),
    )  # fmt: skip


def quest_quantize_triton(
    x: torch.Tensor,
    bits: int,
    block: int,
    sumsq: torch.Tensor | None = None,
    mask_rule: str = "trust",
    rotated: bool = False,
    with_codes: bool = True,
) -> QuestOut:
    """Triton twin of quest_quantize_ref: x [rows, n] -> QuestOut (codes, mask unpacked).

    with_codes=False skips writing codes (QuestOut.codes is None): the activation path.
    """
    _check_rows(x, bits, block, mask_rule)
    x = x.contiguous()
    rows, n = x.shape
    values = torch.empty_like(x)
    codes = torch.empty(rows, n, dtype=torch.uint8, device=x.device) if with_codes else None
    step = torch.empty(rows, dtype=torch.float32, device=x.device)
    mask = torch.empty(rows, n, dtype=torch.bool, device=x.device)
    _launch(x, bits, block, sumsq, mask_rule, rotated, values, codes, step,
            mask.view(torch.uint8), pack=False, write_codes=with_codes)  # fmt: skip
    return QuestOut(values, codes, step.view(rows, 1), mask)


def quest_quantize_packed_triton(
    x: torch.Tensor,
    bits: int,
    block: int,
    sumsq: torch.Tensor | None = None,
    mask_rule: str = "trust",
    rotated: bool = False,
) -> QuestPacked:
    """Triton twin of quest_quantize_packed_ref: codes in b-bit fields, mask in bits; n % 8 == 0."""
    _check_rows(x, bits, block, mask_rule)
    rows, n = x.shape
    if n % 8:
        raise ValueError(f"packed quantization needs a row length divisible by 8, got {n}")
    x = x.contiguous()
    values = torch.empty_like(x)
    codes = torch.empty(rows, n * bits // 8, dtype=torch.uint8, device=x.device)
    step = torch.empty(rows, dtype=torch.float32, device=x.device)
    mask = torch.empty(rows, n // 8, dtype=torch.uint8, device=x.device)
    _launch(x, bits, block, sumsq, mask_rule, rotated, values, codes, step, mask,
            pack=True)  # fmt: skip
    return QuestPacked(values, codes, step.view(rows, 1), mask)
