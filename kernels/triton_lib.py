"""Triton device functions shared by the kernels: the building blocks, each mirroring a torch twin.

Only builtins of triton.language are used (no tl.sum & co., which are themselves @jit
functions fixed as compiled or interpreted when triton is first imported), so the kernels
run under the interpreter even if triton was imported earlier in the process.
Every function works on a register tile x [R, N] (N a power of two, rows = tokens or weight
rows, zero-padded past the real row length) and reproduces its reference bit-for-bit:
  fwht_tile        the butterfly of ``hadamard.fwht_ref`` (same stage order, same adds),
                   then one multiply by fp32(1/sqrt(B))
  tree_row_sum     the fixed-order sum of ``sumsq.row_sumsq_tree_ref`` (zero padding adds
                   exact zeros), as reductions over axes of size 2 (a + b, exact either way);
                   tree_partial and tree_finish are its two halves (for rows in chunks)
  round_half_even  torch.round by the 1.5 * 2^23 trick (libdevice rint does not run in the
                   interpreter)
  quest_grid       grid.grid_step / grid_codes / grid_values and the trust / clip mask
  cast_rne         torch's round-to-nearest-even .to(dtype) (bf16 done on the bits)
  pack_rows_store  pack.pack_ref's little-endian bit stream, 8 codes -> ``bits`` bytes
  or_lanes         the OR of disjoint bit fields over a tile's last axis (pack / unpack)
Divisions and square roots are correctly rounded (div_rn / sqrt_rn, or div_rn_by for a
divisor shared by a row), as torch on CPU; launchers pass
``enable_fp_fusion=False`` so the compiler contracts no mul+add that torch rounds twice.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .grid import RMS_FLOOR
from .sumsq import next_pow2, row_warps, tree_dims

TRUST = 0  # mask rule codes used by the kernels (QuantSpec.mask 'trust' / 'clip')
CLIP = 1
RMS_FLOOR_F32 = tl.constexpr(RMS_FLOOR)
ROUND_MAGIC = tl.constexpr(1.5 * 2**23)
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def fwht_tile(x, R: tl.constexpr, N: tl.constexpr, LOG_B: tl.constexpr, hscale):
    """x [R, N] fp32 -> x (I ⊗ H_B) along dim 1, B = 2^LOG_B dividing N; hscale = fp32 B^-1/2."""
    for s in tl.static_range(LOG_B):  # stage h = 2^s: pairs (j, j + h) in blocks of 2h
        x = tl.reshape(x, [R, N >> (s + 1), 2, 1 << s])
        x = tl.permute(x, (0, 1, 3, 2))
        a, b = tl.split(x)
        x = tl.join(a + b, a - b)
        x = tl.permute(x, (0, 1, 3, 2))
        x = tl.reshape(x, [R, N])
    return x * hscale


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """fp32 x -> DTYPE rounding to nearest even, as torch's .to(). Compiled, that is the
    native cast (cvt.rn); the interpreter's fp32->bf16 cast truncates, so there bf16 is
    rounded on the bits first, then the exact value is cast."""
    if DTYPE == tl.bfloat16 and INTERPRETED:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _add(a, b):
    """The combine function of _halve's reduction."""
    return a + b


@triton.jit
def _halve(x, R: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
    """x [R, A 2 B] -> [R, A B]: element (a, 0, b) + (a, 1, b). Compiled, a reduction over
    an axis of size 2 (in-thread, shuffle or shared memory, wherever that axis lives); the
    interpreter runs a custom reduction element by element in Python, so there it splits."""
    x = tl.reshape(x, [R, A, 2, B])
    if INTERPRETED:
        lo, hi = tl.split(tl.permute(x, (0, 1, 3, 2)))
        x = lo + hi
    else:
        x = tl.reduce(x, 2, _add)
    return tl.reshape(x, [R, A * B])


@triton.jit
def tree_row_sum(
    x, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_W: tl.constexpr,
    LOG_L: tl.constexpr, LOG_V: tl.constexpr,
):  # fmt: skip
    """[R, N] fp32 -> [R] in sumsq.row_sumsq_tree_ref's order: the row as [H, W, L, V]
    (sumsq.tree_dims; W, L, V = 2^LOG_W, 2^LOG_L, 2^LOG_V), halving V, H, L, then W."""
    x = tree_partial(x, R, N, LOG_N, LOG_W, LOG_L, LOG_V)
    return tree_finish(x, R, LOG_W, LOG_L)


@triton.jit
def tree_partial(
    x, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_W: tl.constexpr,
    LOG_L: tl.constexpr, LOG_V: tl.constexpr,
):  # fmt: skip
    """The first halvings of tree_row_sum: [R, N] as [H, W, L, V] -> [R, W L], V then H."""
    for s in tl.static_range(LOG_V):
        x = _halve(x, R, N >> LOG_V, (1 << LOG_V) >> (s + 1))
    for s in tl.static_range(LOG_N - LOG_W - LOG_L - LOG_V):
        x = _halve(x, R, 1, (N >> LOG_V) >> (s + 1))
    return x


@triton.jit
def tree_finish(x, R: tl.constexpr, LOG_W: tl.constexpr, LOG_L: tl.constexpr):
    """The last halvings of tree_row_sum: [R, W L] -> [R], L then W."""
    for s in tl.static_range(LOG_L):
        x = _halve(x, R, 1 << LOG_W, (1 << LOG_L) >> (s + 1))
    for s in tl.static_range(LOG_W):
        x = _halve(x, R, 1, (1 << LOG_W) >> (s + 1))
    return tl.reshape(x, [R])


@triton.jit
def load_tile(tiles_ptr, table_ptr, t, R: tl.constexpr, NCOL: tl.constexpr):
    """Tile t of a SegmentTable's tile list: (start, n_rows, row_len, bits, flags) of its
    segment (segments.COLUMNS) and its row indices r [R, 1]."""
    seg = tl.load(tiles_ptr + 2 * t)
    row0 = tl.load(tiles_ptr + 2 * t + 1)
    entry = table_ptr + seg * NCOL
    start = tl.load(entry + 1)
    n_rows = tl.load(entry + 3)
    row_len = tl.load(entry + 4)
    bits = tl.load(entry + 5)
    flags = tl.load(entry + 6)
    return start, n_rows, row_len, bits, flags, (row0 + tl.arange(0, R))[:, None]


@triton.jit
def adamw_tile(p, g, m, v, decay, w1, c2, beta2, bias2_sqrt, inv_bias2_sqrt, eps, step_size):
    """One AdamW step of a tile, op for op as adamw_update (fmas where torch's CPU kernels
    fuse: lerp_, addcmul_, add(alpha)): W <- W (1 - lr wd); m <- lerp(m, g, 1 - b1);
    v <- fma((1 - b2) g, g, v b2); W <- W + (-lr / bias1) m / (sqrt(v) / sqrt(bias2) + eps).
    Returns (W, m, v)."""
    p = p * decay
    if w1 < 0.5:
        m = tl.fma(w1, g - m, m)
    else:
        m = tl.fma(w1 - 1.0, g - m, g)
    v = tl.fma(c2 * g, g, v * beta2)
    denom = div_rn_by(tl.math.sqrt_rn(v), bias2_sqrt, inv_bias2_sqrt) + eps
    return p + tl.math.div_rn(step_size * m, denom), m, v


@triton.jit
def round_half_even(t):
    """torch.round of fp32 t, |t| < 2^22: adding 1.5 * 2^23 leaves a sum whose ulp is 1, so
    the fp32 add itself rounds t to the nearest integer, ties to even; subtracting is exact."""
    return (t + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def quest_step(sumsq, row_len_f, alpha, levels_m1):
    """D = 2 * alpha * max(sqrt(sumsq / n), RMS_FLOOR) / (2^b - 1), op for op as grid_step."""
    rms = tl.math.sqrt_rn(tl.math.div_rn(sumsq, row_len_f))
    rms = tl.maximum(rms, RMS_FLOOR_F32)
    return tl.math.div_rn(2.0 * (alpha * rms), levels_m1)


@triton.jit
def div_rn_by(a, b, inv_b):
    """a / b rounded to nearest, given inv_b = RN(1 / b) (one division per row, not per
    element): q = RN(a inv_b) is within an ulp, r = a - b q is exact in an fma, and
    RN(q + r inv_b) is the correctly rounded quotient (Markstein) while r cannot underflow,
    i.e. for |a| >= 2^-100 or a = 0. quest_grid: RMS_FLOOR keeps D >= 2^-45, so any a below
    that moves a / D + h by far less than half an ulp of h >= 1/2. Adam: a = sqrt(v) >= 2^-75.
    """
    q = a * inv_b
    return tl.fma(tl.fma(-b, q, a), inv_b, q)


@triton.jit
def quest_grid(y, step, levels_m1, MASK_RULE: tl.constexpr):
    """y [R, N] fp32, step [R, 1] -> (codes fp32 in [0, 2^b), values fp32, mask bool).

    k = round_half_even(clamp(y, -c, c) / D + h), h = (2^b-1)/2, c = D h; v = (k - h) D;
    mask: trust |y - v| <= D/2, clip |y| <= c. As grid.grid_codes, no clamp of k is needed.
    """
    half = levels_m1 * 0.5
    clip = step * half
    t = div_rn_by(tl.clamp(y, -clip, clip), step, tl.math.div_rn(1.0, step)) + half
    k = round_half_even(t)
    v = (k - half) * step
    if MASK_RULE == 0:
        m = tl.abs(y - v) <= step * 0.5
    else:
        m = tl.abs(y) <= clip
    return k, v, m


@triton.constexpr_function
def ilog2(n: int) -> int:
    """log2 of a power of two, at compile time."""
    return n.bit_length() - 1


@triton.constexpr_function
def next_pow2_constexpr(n: int) -> int:
    """sumsq.next_pow2 at compile time (a constexpr function may call no Python function)."""
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def or_lanes(x, M: tl.constexpr, LANES: tl.constexpr):
    """x [M, LANES] of disjoint bit fields -> [M], OR over the lanes by halving (LANES a
    power of two): lane j with lane j + LANES / 2, and so on."""
    for s in tl.static_range(ilog2(LANES)):
        x = tl.reshape(x, [M, 2, LANES >> (s + 1)])
        a, b = tl.split(tl.permute(x, (0, 2, 1)))
        x = a | b
    return tl.reshape(x, [M])


@triton.jit
def pack_rows_store(
    codes, out_ptr, row_byte_off, col_mask, R: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr
):
    """Store integer codes [R, N] (N % 8 == 0) as BITS-bit fields, little-endian stream.

    Group j of 8 codes becomes one int64 word w = sum_i k_i << (BITS i), written as bytes
    out[row_byte_off + j * BITS + i] = (w >> 8 i) & 255, i < BITS: one vector store per
    group where BITS is a power of two, else byte by byte; col_mask [R, N // 8] selects groups.
    """
    shift = (tl.arange(0, N) % 8 * BITS).to(tl.int64)
    word = tl.reshape(codes.to(tl.int64) << shift[None, :], [R * (N // 8), 8])
    word = tl.reshape(or_lanes(word, R * (N // 8), 8), [R, N // 8])
    group_at = row_byte_off + tl.arange(0, N // 8)[None, :] * BITS
    if BITS & (BITS - 1):  # a group of 3, 5, 6 or 7 bytes has no vector access
        for i in tl.static_range(BITS):
            byte = ((word >> (8 * i)) & 255).to(tl.uint8)
            tl.store(out_ptr + group_at + i, byte, mask=col_mask)
    else:
        lane = tl.arange(0, BITS)[None, None, :]
        byte = ((word[:, :, None] >> (8 * lane).to(tl.int64)) & 255).to(tl.uint8)
        tl.store(out_ptr + group_at[:, :, None] + lane, byte, mask=col_mask[:, :, None])


def log2_exact(n: int, what: str) -> int:
    """log2 of a power of two ``n``, else raise naming ``what``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")
    return n.bit_length() - 1


def reduction_rows(rows_interpreted: int) -> int:
    """Rows per program of a kernel that reduces rows (tree_row_sum): compiled, one row (the
    layout solver of triton 3.6-3.9 does not finish on [R > 1, N] tiles with the size-2
    reductions); under the interpreter, the given count (its cost is per program)."""
    return rows_interpreted if INTERPRETED else 1


def launch_opts(tile_elements: int = 1024) -> dict:
    """Keyword options every launcher passes: no mul+add contraction (bit-exact vs torch) and
    sumsq.row_warps of the tile (tests/kernels/sm90_compile.py shows the spills)."""
    return {"enable_fp_fusion": False, "num_warps": row_warps(next_pow2(tile_elements))}


def tree_opts(width: int, itemsize: int) -> dict:
    """The constexprs LOG_W, LOG_L, LOG_V of tree_row_sum for rows of ``width`` (a power of
    two) of ``itemsize``-byte elements (the element size of the tensor the twin is given)."""
    _, warps, lanes, vector = tree_dims(width, itemsize)
    return {f"LOG_{k}": log2_exact(v, k) for k, v in (("W", warps), ("L", lanes), ("V", vector))}
