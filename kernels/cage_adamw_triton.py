"""Fused CAGE-AdamW step over a flat fp32 shard: one launch per row width of a ZeRO partition.

A tile = R whole rows of one segment (tile list from SegmentTable.tiles; one program per
tile unless a Schedule says otherwise), held in registers [R, N] (N = the next power of two
of the row: one launch per width, SegmentTable.by_width; padding is never loaded). From one
read of param, grad, exp_avg, exp_avg_sq it computes, for quantized segments, in order:
    ste:        g <- fwht(M(W) ⊙ g)                 (mask of q(W H) of the old W)
    coupled:    g <- fma(lam, W - Q(W), g)
    W <- W (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- fma((1-b2) g, g, v b2)
    W <- W + (-lr / bias1) m / (sqrt(v) / sqrt(bias2) + eps)
    decoupled:  W <- fma(-lr lam, W - Q(W), W)      (fresh statistics of the updated W)
    qout <- q(W H) in qout.dtype (rotated domain), or W for unquantized segments
    mask_out <- the STE mask of that q(W H) (uint8 0/1; 1 for unquantized segments)
and writes param, exp_avg, exp_avg_sq, qout, mask_out once. Q(W) = fwht(q(fwht(W))) with the
tree row sum of squares, all in registers. The fma / rounding placement mirrors what torch's CPU
kernels do for the twin's ops (lerp_, add(alpha), addcmul_ are fused multiply-adds there),
so the interpreter matches cage_adamw_ref bit-for-bit on such CPUs; tests still allow the
derived ulp tolerance (see tests/kernels/test_cage_adamw.py).
With UPDATE=False the same kernel only writes qout (and mask_out) of the current W
(quest_shard_quantize).
Twins: ``cage_adamw_ref.cage_adamw_shard_ref`` / ``quest_shard_quantize_ref``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .adamw_update import VARIANTS
from .cage_adamw_chunked_triton import _cage_adamw_chunked_kernel
from .grid import ALPHA
from .segments import COLUMNS, FLAG_STE, SegmentTable
from .sumsq import row_warps
from .triton_lib import (
    CLIP,
    TRUST,
    adamw_tile,
    cast_rne,
    fwht_tile,
    launch_opts,
    load_tile,
    log2_exact,
    quest_grid,
    quest_step,
    reduction_rows,
    tree_opts,
    tree_row_sum,
)

N_COLS = len(COLUMNS)


@triton.jit
def _quest_values(
    w, cols, row_len_f, alpha, levels_m1, hscale, R: tl.constexpr, N: tl.constexpr,
    LOG_N: tl.constexpr, LOG_W: tl.constexpr, LOG_L: tl.constexpr, LOG_V: tl.constexpr,
    LOG_B: tl.constexpr,
    MASK_RULE: tl.constexpr,
):  # fmt: skip
    """Rows w [R, N] (cols: real columns) -> (q(w H) values, STE mask), zero past the row."""
    w = tl.where(cols, w, 0.0)
    y = fwht_tile(w, R, N, LOG_B, hscale)
    sumsq = tree_row_sum(w * w, R, N, LOG_N, LOG_W, LOG_L, LOG_V)
    step = quest_step(sumsq, row_len_f, alpha, levels_m1)
    _, v, m = quest_grid(y, step[:, None], levels_m1, MASK_RULE)
    return tl.where(cols, v, 0.0), m


@triton.jit
def _cage_adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, mask_ptr, mask_in_ptr, table_ptr, tiles_ptr, alpha_ptr,
    n_tiles, decay, w1, c2, beta2, bias2_sqrt, inv_bias2_sqrt, eps, step_size, lam, neg_lr_lam,
    hscale,
    R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_W: tl.constexpr,
    LOG_L: tl.constexpr, LOG_V: tl.constexpr,
    LOG_B: tl.constexpr, NCOL: tl.constexpr, STE_FLAG: tl.constexpr,
    MASK_RULE: tl.constexpr, COUPLED: tl.constexpr, DECOUPLED: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_MASK: tl.constexpr, HAS_MASK_IN: tl.constexpr,
    UPDATE: tl.constexpr, ALIGNED: tl.constexpr,
    LOOP: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Each program takes tile pid, or with LOOP tiles pid, pid + programs, ... (Schedule);
    STAGES > 1 lets Triton's pipeliner load the next tile (cp.async) while this one computes.
    A tile is whole rows of one segment (module docstring). UPDATE=False only writes the
    quantized copy of the current W (grad / moment pointers are then never read)."""
    first = tl.program_id(0)
    if LOOP:
        last, stride = n_tiles, tl.num_programs(0)
    else:
        last, stride = first + 1, 1
    for t in tl.range(first, last, stride, num_stages=STAGES):  # tile t: its rows
        start, n_rows, row_len, bits, flags, r = load_tile(tiles_ptr, table_ptr, t, R, NCOL)
        cols = tl.arange(0, N)[None, :] < row_len
        inb = (r < n_rows) & cols
        offs = start + r * row_len + tl.arange(0, N)[None, :]
        if ALIGNED:  # rows start and end at multiples of 4 elements: 16-byte vector accesses
            offs = tl.multiple_of(offs, [1, 4])
            inb = tl.max_constancy(inb, [1, 4])
        p = tl.load(p_ptr + offs, mask=inb, other=0.0)
        quant = bits > 0
        row_len_f = row_len.to(tl.float32)
        alpha = tl.load(alpha_ptr + bits)
        levels_m1 = ((1 << bits) - 1).to(tl.float32)
        if UPDATE:
            g = tl.load(g_ptr + offs, mask=inb, other=0.0)
            m = tl.load(m_ptr + offs, mask=inb, other=0.0)
            v = tl.load(v_ptr + offs, mask=inb, other=0.0)
            if quant:
                if COUPLED:  # q(W H) of the old W: Q(W) below, and the STE's mask
                    qv, old_mask = _quest_values(p, cols, row_len_f, alpha, levels_m1, hscale, R,
                                                 N, LOG_N, LOG_W, LOG_L, LOG_V, LOG_B,
                                                 MASK_RULE)  # fmt: skip
                if (flags & STE_FLAG) != 0:
                    if HAS_MASK_IN:  # M(W) given (the previous step's mask_out of this W)
                        mask = tl.load(mask_in_ptr + offs, mask=inb, other=0) != 0
                    elif COUPLED:
                        mask = old_mask
                    else:
                        _, mask = _quest_values(p, cols, row_len_f, alpha, levels_m1, hscale, R,
                                                N, LOG_N, LOG_W, LOG_L, LOG_V, LOG_B,
                                                MASK_RULE)  # fmt: skip
                    g = fwht_tile(g * mask.to(tl.float32), R, N, LOG_B, hscale)
                if COUPLED:
                    g = tl.fma(lam, p - fwht_tile(qv, R, N, LOG_B, hscale), g)
            p, m, v = adamw_tile(p, g, m, v, decay, w1, c2, beta2, bias2_sqrt, inv_bias2_sqrt,
                                 eps, step_size)  # fmt: skip
            if quant:
                if DECOUPLED:
                    qv, _ = _quest_values(p, cols, row_len_f, alpha, levels_m1, hscale, R, N,
                                          LOG_N, LOG_W, LOG_L, LOG_V, LOG_B, MASK_RULE)  # fmt: skip
                    p = tl.fma(neg_lr_lam, p - fwht_tile(qv, R, N, LOG_B, hscale), p)
            tl.store(p_ptr + offs, p, mask=inb)
            tl.store(m_ptr + offs, m, mask=inb)
            tl.store(v_ptr + offs, v, mask=inb)
        if HAS_Q or HAS_MASK:
            low = p
            keep = inb
            if quant:
                low, keep = _quest_values(p, cols, row_len_f, alpha, levels_m1, hscale, R, N,
                                          LOG_N, LOG_W, LOG_L, LOG_V, LOG_B, MASK_RULE)  # fmt: skip
            if HAS_Q:
                tl.store(q_ptr + offs, cast_rne(low, q_ptr.dtype.element_ty), mask=inb)
            if HAS_MASK:
                tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=inb)


class Schedule(NamedTuple):
    """How the tiles map to programs. Fewer programs than tiles loop over the tiles; with
    stages > 1 each program's loads of its next tile overlap the arithmetic of this one;
    max_registers caps registers per thread (ptxas spills the rest) so more programs fit on
    an SM; chunks = 2 or 4 holds a row in that many pieces at a time (one program per tile,
    cage_adamw_chunked_triton; same results). The default (default_schedule) is what
    benchmarks/gpu_probe.py measured fastest; chunks is not measured yet (kernel_tuning.md,
    section 9), so the default keeps whole rows."""

    programs: int
    stages: int = 1
    max_registers: int | None = None
    chunks: int = 1


def default_schedule(device: torch.device, n_tiles: int, width: int) -> Schedule:
    """One program per tile. On a GPU, where each thread holds at most 8 elements of a row,
    registers are capped at 80 so that more programs fit on an SM (3 of 8 warps instead of 2
    at width 2048): the lambda > 0 steps went from 83 % to 92 % of copy on an H100 at width
    2048 and from 73 % to 83 % on an H200 at width 1024, lambda = 0 gained 0.5 to 4.5 points.
    With 16 elements a thread (widths 4096 and 8192) the cap spills and costs up to half the
    rate, so those keep every register (docs/benchmarks/kernel_tuning.md, section 8)."""
    per_thread = width // (32 * row_warps(width))
    if device.type != "cuda" or per_thread > 8:
        return Schedule(n_tiles)
    return Schedule(n_tiles, max_registers=80)


@functools.lru_cache(maxsize=16)
def alpha_table(device: str) -> torch.Tensor:
    """fp32 [9]: ALPHA[b] at index b (index 0 unused), the grid's clip table for the kernel."""
    return torch.tensor([ALPHA.get(b, 0.0) for b in range(9)], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def device_table(table: SegmentTable, device: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table tensor, tile list) on ``device``, built once per table (tables are immutable)."""
    return table.tensor(device), table.tiles(rows, device)


def rows_per_tile(width: int) -> int:
    """Rows per program: ~32K elements under the interpreter, one compiled (reduction_rows)."""
    return reduction_rows(max(1, (1 << 15) // width))


def cage_adamw_shard_triton(
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
    schedule: Schedule | None = None,
) -> None:
    """Triton twin of cage_adamw_shard_ref (same arguments, and the Schedule of the launch);
    the device copies of the table and its tile list are cached per (table, device)."""
    if variant not in VARIANTS:
        raise ValueError(f"cage_variant must be one of {VARIANTS}, got {variant!r}")
    shard = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    _check_shard(shard, table, qout, mask_out, mask_in)
    if not table.segments:
        return
    bias1 = 1 - beta1**step
    bias2_sqrt = torch.tensor((1 - beta2**step) ** 0.5, dtype=torch.float32)
    inv_bias2_sqrt = (1.0 / bias2_sqrt).item()  # RN32(1 / fp32 divisor), for div_rn_by
    correct = lam > 0
    _launch(
        table, param, grad, exp_avg, exp_avg_sq, qout, mask_out, mask_in,
        (1 - lr * weight_decay, 1 - beta1, 1 - beta2, beta2, bias2_sqrt.item(), inv_bias2_sqrt,
         eps, -lr / bias1, lam, -lr * lam),
        coupled=correct and variant == "coupled", decoupled=correct and variant == "decoupled",
        update=True, schedule=schedule,
    )  # fmt: skip


def quest_shard_quantize_triton(
    param: torch.Tensor,
    table: SegmentTable,
    qout: torch.Tensor,
    mask_out: torch.Tensor | None = None,
    schedule: Schedule | None = None,
) -> None:
    """Triton twin of quest_shard_quantize_ref: qout <- q(W H) (or W) over the table's rows,
    mask_out <- its STE mask (the Schedule of the launch as in cage_adamw_shard_triton)."""
    _check_shard({"param": param}, table, qout, mask_out)
    if qout is None:
        raise ValueError("quest_shard_quantize needs a qout buffer")
    if table.segments:
        no_hp = (1.0, 0.1, 0.1, 0.9, 1.0, 1.0, 1e-8, 0.0, 0.0, 0.0)  # unused without UPDATE
        _launch(table, param, param, param, param, qout, mask_out, None, no_hp, coupled=False,
                decoupled=False, update=False, schedule=schedule)  # fmt: skip


def _check_shard(
    shard: dict[str, torch.Tensor], table: SegmentTable, qout, mask_out, mask_in=None
) -> None:
    for name, t in shard.items():
        if t.dtype != torch.float32 or not t.is_contiguous() or t.dim() != 1:
            raise ValueError(
                f"{name} must be a contiguous 1-D fp32 shard, got {t.dtype} {tuple(t.shape)}"
            )
        table.check_shard(t.numel(), name)
    if qout is not None:
        if qout.dim() != 1 or not qout.is_contiguous() or qout.numel() < table.end:
            raise ValueError(f"qout must be a contiguous 1-D buffer of >= {table.end} elements")
    for name, mask in (("mask_out", mask_out), ("mask_in", mask_in)):
        if mask is not None and (
            mask.dtype != torch.bool
            or mask.dim() != 1
            or not mask.is_contiguous()
            or mask.numel() < table.end
        ):
            raise ValueError(
                f"{name} must be a contiguous 1-D bool buffer of >= {table.end} "
                f"elements, got {mask.dtype} {tuple(mask.shape)}"
            )


def _launch(
    table, param, grad, exp_avg, exp_avg_sq, qout, mask_out, mask_in, scalars, coupled,
    decoupled, update, schedule,
):  # fmt: skip
    """One kernel launch per tile width of the table (SegmentTable.by_width)."""
    if schedule is not None and (
        schedule.programs < 1 or schedule.stages < 1 or (schedule.max_registers or 24) < 24
        or schedule.chunks not in (1, 2, 4)
    ):  # fmt: skip
        raise ValueError(
            "a Schedule needs programs >= 1, stages >= 1, max_registers >= 24, chunks 1, 2 "
            f"or 4, got {schedule}"
        )
    dev = param.device
    for part in _by_width(table):
        width = part.width
        tile = rows_per_tile(width)
        table_tensor, tiles = device_table(part, str(dev), tile)
        n_tiles = tiles.shape[0]
        sched = schedule or default_schedule(dev, n_tiles, width)
        opts = launch_opts(tile * width)
        if sched.max_registers is not None:
            opts["maxnreg"] = sched.max_registers
        tree = tree_opts(width, param.element_size())
        args = (
            param, grad, exp_avg, exp_avg_sq, qout if qout is not None else param,
            mask_out.view(torch.uint8) if mask_out is not None else param,
            mask_in.view(torch.uint8) if mask_in is not None else param,
            table_tensor, tiles, alpha_table(str(dev)), n_tiles, *scalars, part.block**-0.5,
        )  # fmt: skip
        consts = dict(
            R=tile, N=width, LOG_N=log2_exact(width, "table width"), **tree,
            LOG_B=log2_exact(part.block, "block"), NCOL=N_COLS, STE_FLAG=FLAG_STE,
            MASK_RULE=TRUST if part.mask_rule == "trust" else CLIP,
            COUPLED=coupled, DECOUPLED=decoupled, HAS_Q=qout is not None,
            HAS_MASK=mask_out is not None, HAS_MASK_IN=mask_in is not None, UPDATE=update,
            ALIGNED=all(s.shard_start % 4 == 0 and s.row_len % 4 == 0 for s in part.segments),
            **opts,
        )  # fmt: skip
        if sched.chunks == 1:
            _cage_adamw_kernel[(min(sched.programs, n_tiles),)](
                *args, LOOP=sched.programs < n_tiles, STAGES=sched.stages, **consts
            )
            continue
        slices = width >> (tree["LOG_W"] + tree["LOG_L"] + tree["LOG_V"])  # H of tree_dims
        if sched.chunks > slices or sched.programs < n_tiles or sched.stages != 1:
            raise ValueError(
                f"Schedule(chunks={sched.chunks}) splits a row of width {width} into h-slices "
                f"({slices} here, so at most {slices} chunks) and runs one program per tile "
                f"(programs >= {n_tiles}, stages 1), got {sched}"
            )
        _cage_adamw_chunked_kernel[(n_tiles,)](
            *args, LOG_K=log2_exact(sched.chunks, "chunks"), **consts
        )


@functools.lru_cache(maxsize=64)
def _by_width(table: SegmentTable) -> tuple[SegmentTable, ...]:
    return table.by_width()
