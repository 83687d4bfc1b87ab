"""Triton pack / unpack of b-bit codes (layout of ``pack.pack_ref`` / ``unpack_ref``, the twins).

A tensor [..., n] with n b % 8 == 0 packs row by row into whole bytes, so its packed form
equals the packed flat stream: the kernels work on the flat stream. Pack: program p takes
G groups of 8 codes (zero past the end), forms w = sum_i k_i << (b i) and writes its b
bytes. Unpack, the inverse: program p reads G groups of b bytes, forms the same word and
writes its 8 codes (w >> b i) & (2^b - 1). Where b is a power of two a group's bytes are one
vector access (b = 3, 5, 6, 7: masked lanes up to the next power of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import check_bits
from .quest_triton import interpreting
from .triton_lib import launch_opts, next_pow2_constexpr, or_lanes, pack_rows_store


@triton.jit
def _pack_kernel(codes_ptr, out_ptr, n_codes, G: tl.constexpr, BITS: tl.constexpr):
    """Groups pid*G .. pid*G+G-1 of 8 codes -> BITS bytes each."""
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    idx = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    k = tl.load(codes_ptr + idx, mask=idx < n_codes, other=0).to(tl.int32)
    n_bytes = n_codes * BITS // 8
    k = tl.reshape(k, [1, G * 8])
    byte0 = g * BITS
    pack_rows_store(k, out_ptr + tl.program_id(0).to(tl.int64) * G * BITS, 0,
                    (byte0 < n_bytes)[None, :], 1, G * 8, BITS)  # fmt: skip


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, n_codes, n_bytes, G: tl.constexpr, BITS: tl.constexpr):
    """Groups pid*G .. pid*G+G-1: BITS bytes (one vector load where BITS is a power of two)
    -> word w = sum_i byte_i << 8 i -> 8 codes (w >> BITS j) & (2^BITS - 1), one store."""
    LANES: tl.constexpr = next_pow2_constexpr(BITS)
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    lane = tl.arange(0, LANES)[None, :]
    at = g[:, None] * BITS + lane
    live = at < n_bytes
    if LANES != BITS:
        live = live & (lane < BITS)
    byte = tl.load(packed_ptr + at, mask=live, other=0).to(tl.int64)
    word = or_lanes(byte << (8 * lane).to(tl.int64), G, LANES)
    j = tl.arange(0, 8)[None, :]
    k = (word[:, None] >> (BITS * j).to(tl.int64)) & ((1 << BITS) - 1)
    idx = g[:, None] * 8 + j
    tl.store(out_ptr + idx, k.to(tl.uint8), mask=idx < n_codes)


def _block() -> int:
    return 1 << 15 if interpreting() else 1 << 10


def pack_triton(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (values < 2^b) -> uint8 [..., n b / 8]."""
    check_bits(bits)
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into whole bytes")
    flat = codes.contiguous().view(-1)
    out = torch.empty(*codes.shape[:-1], n * bits // 8, dtype=torch.uint8, device=codes.device)
    if flat.numel():
        groups = triton.cdiv(flat.numel(), 8)
        g = _block() // 8
        if interpreting():  # one program when the stream is short (2 ms per program)
            g = min(g, 1 << max(0, (groups - 1).bit_length()))
        _pack_kernel[(triton.cdiv(groups, g),)](flat, out, flat.numel(), G=g, BITS=bits,
                                                **launch_opts())  # fmt: skip
    return out


def unpack_triton(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., m] -> uint8 codes [..., m 8 / b]."""
    check_bits(bits)
    m = packed.shape[-1]
    if (m * 8) % bits:
        raise ValueError(f"{m} bytes do not hold a whole number of {bits}-bit codes")
    flat = packed.contiguous().view(-1)
    out = torch.empty(*packed.shape[:-1], m * 8 // bits, dtype=torch.uint8, device=packed.device)
    n_codes = out.numel()
    if n_codes:
        groups = triton.cdiv(n_codes, 8)
        g = _block() // 8
        if interpreting():
            g = min(g, 1 << max(0, (groups - 1).bit_length()))
        _unpack_kernel[(triton.cdiv(groups, g),)](flat, out, n_codes, flat.numel(), G=g,
                                                  BITS=bits, **launch_opts())  # fmt: skip
    return out
