"""Triton device functions shared by the kernels: the building blocks, each mirroring a torch twin.

Only builtins of triton.language are used (no tl.sum & co., which are themselves @jit
functions fixed as compiled or interpreted when triton is first imported), so the kernels
run under the interpreter even if triton was imported earlier in the process.
Every function works on a register tile x [R, N] (N a power of two, rows = tokens or weight
rows, zero-padded past the real row length) and reproduces its reference bit-for-bit:
  fwht_tile        the butterfly of ``hadamard.fwht_ref`` (same stage order, same adds),
                   then one multiply by fp32(1/sqrt(B))
  tree_row_sum     the pairwise halving sum of ``sumsq.row_sumsq_tree_ref`` (zero padding to
                   any larger power of two adds exact zeros, so the sum does not change)
  round_half_even  torch.round from floor (libdevice rint does not run in the interpreter)
  quest_grid       grid.grid_step / grid_codes / grid_values and the trust / clip mask
  cast_rne         torch's round-to-nearest-even .to(dtype) (bf16 done on the bits)
  pack_rows_store  pack.pack_ref's little-endian bit stream, 8 codes -> ``bits`` bytes
Divisions and square roots use div_rn / sqrt_rn (IEEE, as torch on CPU); launchers pass
``enable_fp_fusion=False`` so the compiler contracts no mul+add that torch rounds twice.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grid import RMS_FLOOR

TRUST = 0  # mask rule codes used by the kernels (QuantSpec.mask 'trust' / 'clip')
CLIP = 1
RMS_FLOOR_F32 = tl.constexpr(RMS_FLOOR)


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
    """fp32 x -> DTYPE rounding to nearest even, as torch's .to(). bf16 is rounded on the bits
    first (the interpreter's own fp32->bf16 cast truncates), then the exact value is cast."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def tree_row_sum(x, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """[R, N] fp32 -> [R]: repeatedly add the right half of the row onto the left half."""
    for s in tl.static_range(LOG_N):
        x = tl.reshape(x, [R, 2, N >> (s + 1)])
        x = tl.permute(x, (0, 2, 1))
        a, b = tl.split(x)
        x = a + b
    return tl.reshape(x, [R])


@triton.jit
def round_half_even(t):
    """torch.round of fp32 t: nearest integer, ties to even (t - floor(t) is exact in fp32)."""
    f = tl.math.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.math.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def quest_step(sumsq, row_len_f, alpha, levels_m1):
    """D = 2 * alpha * max(sqrt(sumsq / n), RMS_FLOOR) / (2^b - 1), op for op as grid_step."""
    rms = tl.math.sqrt_rn(tl.math.div_rn(sumsq, row_len_f))
    rms = tl.maximum(rms, RMS_FLOOR_F32)
    return tl.math.div_rn(2.0 * (alpha * rms), levels_m1)


@triton.jit
def quest_grid(y, step, levels_m1, MASK_RULE: tl.constexpr):
    """y [R, N] fp32, step [R, 1] -> (codes fp32 in [0, 2^b), values fp32, mask bool).

    k = round_half_even(clamp(y, -c, c) / D + h), h = (2^b-1)/2, c = D h; v = (k - h) D;
    mask: trust |y - v| <= D/2, clip |y| <= c.
    """
    half = levels_m1 * 0.5
    clip = step * half
    t = tl.math.div_rn(tl.clamp(y, -clip, clip), step) + half
    k = tl.clamp(round_half_even(t), 0.0, levels_m1)
    v = (k - half) * step
    if MASK_RULE == 0:
        m = tl.abs(y - v) <= step * 0.5
    else:
        m = tl.abs(y) <= clip
    return k, v, m


@triton.jit
def pack_rows_store(
    codes, out_ptr, row_byte_off, col_mask, R: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr
):
    """Store integer codes [R, N] (N % 8 == 0) as BITS-bit fields, little-endian stream.

    Group j of 8 codes becomes one int64 word w = sum_i k_i << (BITS i), written as bytes
    out[row_byte_off + j * BITS + i] = (w >> 8 i) & 255; col_mask [R, N // 8] selects groups.
    """
    shift = (tl.arange(0, N) % 8 * BITS).to(tl.int64)
    word = codes.to(tl.int64) << shift[None, :]
    for s in tl.static_range(3):  # OR the 8 disjoint fields of each group: 8 -> 4 -> 2 -> 1
        word = tl.reshape(word, [R, N // 8, 2, 4 >> s])
        a, b = tl.split(tl.permute(word, (0, 1, 3, 2)))
        word = a | b
    word = tl.reshape(word, [R, N // 8])
    gcol = tl.arange(0, N // 8)[None, :] * BITS
    for i in tl.static_range(BITS):
        byte = ((word >> (8 * i)) & 255).to(tl.uint8)
        tl.store(out_ptr + row_byte_off + gcol + i, byte, mask=col_mask)


def log2_exact(n: int, what: str) -> int:
    """log2 of a power of two ``n``, else raise naming ``what``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")
    return n.bit_length() - 1


def launch_opts(tile_elements: int = 1024) -> dict:
    """Keyword options every launcher passes: no mul+add contraction (bit-exact vs torch) and
    the warp count that spilled least for sm_90a (tests/kernels/sm90_compile.py): 4 warps
    up to 1K-element tiles, 8 up to 4K, 16 above (8K-wide rows still spill some)."""
    warps = 4 if tile_elements <= 1024 else 8 if tile_elements <= 4096 else 16
    return {"enable_fp_fusion": False, "num_warps": warps}
