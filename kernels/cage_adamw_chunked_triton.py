"""The fused CAGE-AdamW step with each row in K chunks (Schedule.chunks = K in 2, 4): the same
results as ``_cage_adamw_kernel`` bit for bit, with a K-th of a row in registers at a time.

Rows as [H, W, L, V] (sumsq.tree_dims; an h-slice is S = W L V contiguous elements, whole
Hadamard blocks); chunk c holds the h-slices h = h' K + c, h' < H / K. The tree sum of a row
halves V, then H, then L, then W. With K dividing H, the first log2(H / K) halvings of H only
add h-slices of one chunk, in the chunk's own halving order over h', and the last log2(K)
add the chunks' partials P_c in the halving order over c: P0 + P1, or (P0 + P2) + (P1 + P3).
So tree_partial of each chunk, combined that way, then tree_finish, is tree_row_sum of the
row, and the twins (cage_adamw_ref, sumsq.row_sumsq_tree_ref) stay as they are.

A program takes one tile (R rows of one segment) in passes over the chunks, each pass
reading what the previous one wrote (L2-resident on a GPU):
    0  (coupled, or STE without a given mask)  the statistic of the old W;
    1  Adam (after the STE / coupled gradient), stores m, v and W', partials of W'^2;
    2  (decoupled)  W = W' - lr lambda (W' - Q(W')), stores W, partials of W^2;
    3  (qout / mask_out)  q(W H) of the final W and its STE mask.
Without UPDATE only a statistic pass and pass 3 run (quest_shard_quantize). Builtins of
triton.language only (tl.full, not tl.zeros: triton_lib's docstring says why).
docs/benchmarks/kernel_tuning.md, section 9: why (wide rows are register-bound when a thread
holds 16 elements) and what a device run must show.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_lib import (
    adamw_tile,
    cast_rne,
    fwht_tile,
    load_tile,
    quest_grid,
    quest_step,
    tree_finish,
    tree_partial,
)


@triton.jit
def _chunk(start, r, n_rows, row_len, c, NC: tl.constexpr, S: tl.constexpr, K: tl.constexpr,
           ALIGNED: tl.constexpr):  # fmt: skip
    """Offsets, in-row columns and in-bounds mask [R, NC] of chunk c of the tile's rows."""
    j = tl.arange(0, NC)
    col = (j // S) * (K * S) + c * S + j % S
    cols = col[None, :] < row_len
    inb = (r < n_rows) & cols
    offs = start + r * row_len + col[None, :]
    if ALIGNED:  # rows start and end at multiples of 4 elements: 16-byte vector accesses
        offs = tl.multiple_of(offs, [1, 4])
        inb = tl.max_constancy(inb, [1, 4])
    return offs, cols, inb


@triton.jit
def _sq_partial(w, cols, R: tl.constexpr, NC: tl.constexpr, LOG_NC: tl.constexpr,
                LOG_W: tl.constexpr, LOG_L: tl.constexpr, LOG_V: tl.constexpr):  # fmt: skip
    w = tl.where(cols, w, 0.0)
    return tree_partial(w * w, R, NC, LOG_NC, LOG_W, LOG_L, LOG_V)


@triton.jit
def _quantize(w, cols, step, levels_m1, hscale, R: tl.constexpr, NC: tl.constexpr,
              LOG_B: tl.constexpr, MASK_RULE: tl.constexpr):  # fmt: skip
    """A chunk w [R, NC] -> (q(w H) values, STE mask) on the row's grid step [R]."""
    w = tl.where(cols, w, 0.0)
    _, v, m = quest_grid(fwht_tile(w, R, NC, LOG_B, hscale), step[:, None], levels_m1, MASK_RULE)
    return tl.where(cols, v, 0.0), m


@triton.jit
def _stat_chunk(ptr, start, r, n_rows, row_len, c, R: tl.constexpr, NC: tl.constexpr,
                LOG_NC: tl.constexpr, S: tl.constexpr, K: tl.constexpr, LOG_W: tl.constexpr,
                LOG_L: tl.constexpr, LOG_V: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """The tree partial [R, W L] of the squares of chunk c of the rows at ptr."""
    offs, cols, inb = _chunk(start, r, n_rows, row_len, c, NC, S, K, ALIGNED)
    w = tl.load(ptr + offs, mask=inb, other=0.0)
    return _sq_partial(w, cols, R, NC, LOG_NC, LOG_W, LOG_L, LOG_V)


@triton.jit
def _row_sumsq(ptr, start, r, n_rows, row_len, R: tl.constexpr, NC: tl.constexpr,
               LOG_NC: tl.constexpr, S: tl.constexpr, K: tl.constexpr, LOG_W: tl.constexpr,
               LOG_L: tl.constexpr, LOG_V: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """Row sums of squares [R] of the rows at ptr, read chunk by chunk, in the row tree's order:
    P0 + P1, or (P0 + P2) + (P1 + P3) (module docstring)."""
    p0 = _stat_chunk(ptr, start, r, n_rows, row_len, 0, R, NC, LOG_NC, S, K, LOG_W, LOG_L,
                     LOG_V, ALIGNED)  # fmt: skip
    p1 = _stat_chunk(ptr, start, r, n_rows, row_len, 1, R, NC, LOG_NC, S, K, LOG_W, LOG_L,
                     LOG_V, ALIGNED)  # fmt: skip
    if K == 4:
        p2 = _stat_chunk(ptr, start, r, n_rows, row_len, 2, R, NC, LOG_NC, S, K, LOG_W, LOG_L,
                         LOG_V, ALIGNED)  # fmt: skip
        p3 = _stat_chunk(ptr, start, r, n_rows, row_len, 3, R, NC, LOG_NC, S, K, LOG_W, LOG_L,
                         LOG_V, ALIGNED)  # fmt: skip
        p = (p0 + p2) + (p1 + p3)
    else:
        p = p0 + p1
    return tree_finish(p, R, LOG_W, LOG_L)


@triton.jit
def _row_step(ptr, start, r, n_rows, row_len, row_len_f, alpha, levels_m1, R: tl.constexpr,
              NC: tl.constexpr, LOG_NC: tl.constexpr, S: tl.constexpr, K: tl.constexpr,
              LOG_W: tl.constexpr, LOG_L: tl.constexpr, LOG_V: tl.constexpr,
              ALIGNED: tl.constexpr):  # fmt: skip
    """The QuEST grid step [R] of the rows at ptr (their fresh statistic)."""
    sumsq = _row_sumsq(ptr, start, r, n_rows, row_len, R, NC, LOG_NC, S, K, LOG_W, LOG_L, LOG_V,
                       ALIGNED)  # fmt: skip
    return quest_step(sumsq, row_len_f, alpha, levels_m1)


@triton.jit
def _update_chunk(
    p_ptr, g_ptr, m_ptr, v_ptr, mask_in_ptr, start, r, n_rows, row_len, c, quant, ste, old_step,
    levels_m1, hscale, decay, w1, c2, beta2, bias2_sqrt, inv_bias2_sqrt, eps, step_size, lam,
    R: tl.constexpr, NC: tl.constexpr, S: tl.constexpr, K: tl.constexpr, LOG_B: tl.constexpr,
    MASK_RULE: tl.constexpr, COUPLED: tl.constexpr, HAS_MASK_IN: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """Pass 1 on chunk c, op for op as _cage_adamw_kernel: the STE and coupled gradient (Q of
    the old W on old_step), AdamW; stores W', m, v."""
    offs, cols, inb = _chunk(start, r, n_rows, row_len, c, NC, S, K, ALIGNED)
    p = tl.load(p_ptr + offs, mask=inb, other=0.0)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    m = tl.load(m_ptr + offs, mask=inb, other=0.0)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0)
    if quant:
        if COUPLED:
            qv, old_mask = _quantize(p, cols, old_step, levels_m1, hscale, R, NC, LOG_B,
                                     MASK_RULE)  # fmt: skip
        if ste:
            if HAS_MASK_IN:
                mask = tl.load(mask_in_ptr + offs, mask=inb, other=0) != 0
            elif COUPLED:
                mask = old_mask
            else:
                _, mask = _quantize(p, cols, old_step, levels_m1, hscale, R, NC, LOG_B,
                                    MASK_RULE)  # fmt: skip
            g = fwht_tile(g * mask.to(tl.float32), R, NC, LOG_B, hscale)
        if COUPLED:
            g = tl.fma(lam, p - fwht_tile(qv, R, NC, LOG_B, hscale), g)
    p, m, v = adamw_tile(p, g, m, v, decay, w1, c2, beta2, bias2_sqrt, inv_bias2_sqrt, eps,
                         step_size)  # fmt: skip
    tl.store(p_ptr + offs, p, mask=inb)
    tl.store(m_ptr + offs, m, mask=inb)
    tl.store(v_ptr + offs, v, mask=inb)


@triton.jit
def _correct_chunk(
    p_ptr, start, r, n_rows, row_len, c, step, levels_m1, hscale, neg_lr_lam,
    R: tl.constexpr, NC: tl.constexpr, S: tl.constexpr, K: tl.constexpr, LOG_B: tl.constexpr,
    MASK_RULE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Pass 2 on chunk c: W = fma(-lr lambda, W' - Q(W'), W') on W''s own grid step."""
    offs, cols, inb = _chunk(start, r, n_rows, row_len, c, NC, S, K, ALIGNED)
    p = tl.load(p_ptr + offs, mask=inb, other=0.0)
    qv, _ = _quantize(p, cols, step, levels_m1, hscale, R, NC, LOG_B, MASK_RULE)
    p = tl.fma(neg_lr_lam, p - fwht_tile(qv, R, NC, LOG_B, hscale), p)
    tl.store(p_ptr + offs, p, mask=inb)


@triton.jit
def _output_chunk(
    p_ptr, q_ptr, mask_ptr, start, r, n_rows, row_len, c, quant, step, levels_m1, hscale,
    R: tl.constexpr, NC: tl.constexpr, S: tl.constexpr, K: tl.constexpr, LOG_B: tl.constexpr,
    MASK_RULE: tl.constexpr, HAS_Q: tl.constexpr, HAS_MASK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Pass 3 on chunk c: qout <- q(W H) (or W unquantized), mask_out <- its STE mask."""
    offs, cols, inb = _chunk(start, r, n_rows, row_len, c, NC, S, K, ALIGNED)
    low = tl.load(p_ptr + offs, mask=inb, other=0.0)
    keep = inb
    if quant:
        low, keep = _quantize(low, cols, step, levels_m1, hscale, R, NC, LOG_B, MASK_RULE)
    if HAS_Q:
        tl.store(q_ptr + offs, cast_rne(low, q_ptr.dtype.element_ty), mask=inb)
    if HAS_MASK:
        tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=inb)


@triton.jit
def _cage_adamw_chunked_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, q_ptr, mask_ptr, mask_in_ptr, table_ptr, tiles_ptr, alpha_ptr,
    n_tiles, decay, w1, c2, beta2, bias2_sqrt, inv_bias2_sqrt, eps, step_size, lam, neg_lr_lam,
    hscale,
    R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_W: tl.constexpr,
    LOG_L: tl.constexpr, LOG_V: tl.constexpr, LOG_K: tl.constexpr,
    LOG_B: tl.constexpr, NCOL: tl.constexpr, STE_FLAG: tl.constexpr,
    MASK_RULE: tl.constexpr, COUPLED: tl.constexpr, DECOUPLED: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_MASK: tl.constexpr, HAS_MASK_IN: tl.constexpr,
    UPDATE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """One program per tile, its rows in K chunks of N / K (module docstring); the arguments
    are _cage_adamw_kernel's, less the looping schedule, plus K = 2^LOG_K."""
    K: tl.constexpr = 1 << LOG_K
    NC: tl.constexpr = N >> LOG_K
    LOG_NC: tl.constexpr = LOG_N - LOG_K
    S: tl.constexpr = 1 << (LOG_W + LOG_L + LOG_V)
    start, n_rows, row_len, bits, flags, r = load_tile(tiles_ptr, table_ptr, tl.program_id(0),
                                                      R, NCOL)  # fmt: skip
    quant = bits > 0
    ste = (flags & STE_FLAG) != 0
    row_len_f = row_len.to(tl.float32)
    alpha = tl.load(alpha_ptr + bits)
    levels_m1 = ((1 << bits) - 1).to(tl.float32)
    if UPDATE:
        old_step = tl.full([R], 0.0, tl.float32)  # the old W's grid step, where a pass needs it
        if COUPLED:
            if quant:
                old_step = _row_step(p_ptr, start, r, n_rows, row_len, row_len_f, alpha,
                                     levels_m1, R, NC, LOG_NC, S, K, LOG_W, LOG_L, LOG_V,
                                     ALIGNED)  # fmt: skip
        elif not HAS_MASK_IN:
            if quant & ste:
                old_step = _row_step(p_ptr, start, r, n_rows, row_len, row_len_f, alpha,
                                     levels_m1, R, NC, LOG_NC, S, K, LOG_W, LOG_L, LOG_V,
                                     ALIGNED)  # fmt: skip
        for c in tl.static_range(K):
            _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, mask_in_ptr, start, r, n_rows, row_len, c,
                          quant, ste, old_step, levels_m1, hscale, decay, w1, c2, beta2,
                          bias2_sqrt, inv_bias2_sqrt, eps, step_size, lam, R, NC, S, K, LOG_B,
                          MASK_RULE, COUPLED, HAS_MASK_IN, ALIGNED)  # fmt: skip
        tl.debug_barrier()  # the passes below read what this one wrote
        if DECOUPLED:
            if quant:
                step1 = _row_step(p_ptr, start, r, n_rows, row_len, row_len_f, alpha, levels_m1,
                                  R, NC, LOG_NC, S, K, LOG_W, LOG_L, LOG_V, ALIGNED)  # fmt: skip
                for c in tl.static_range(K):
                    _correct_chunk(p_ptr, start, r, n_rows, row_len, c, step1, levels_m1,
                                   hscale, neg_lr_lam, R, NC, S, K, LOG_B, MASK_RULE,
                                   ALIGNED)  # fmt: skip
                tl.debug_barrier()
    if HAS_Q or HAS_MASK:
        step = tl.full([R], 0.0, tl.float32)
        if quant:
            step = _row_step(p_ptr, start, r, n_rows, row_len, row_len_f, alpha, levels_m1, R,
                             NC, LOG_NC, S, K, LOG_W, LOG_L, LOG_V, ALIGNED)  # fmt: skip
        for c in tl.static_range(K):
            _output_chunk(p_ptr, q_ptr, mask_ptr, start, r, n_rows, row_len, c, quant, step,
                          levels_m1, hscale, R, NC, S, K, LOG_B, MASK_RULE, HAS_Q, HAS_MASK,
                          ALIGNED)  # fmt: skip
