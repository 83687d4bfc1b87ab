"""Triton pack / unpack of b-bit codes (layout of ``pack.pack_ref`` / ``unpack_ref``, the twins).

A tensor [..., n] with n b % 8 == 0 packs row by row into whole bytes, so its packed form
equals the packed flat stream: the kernels work on the flat stream. Pack: program p takes
G groups of 8 codes (zero past the end), forms w = sum_i k_i << (b i) and writes its b
bytes. Unpack: code i = ((byte[i b // 8] | byte[i b // 8 + 1] << 8) >> (i b % 8)) & (2^b - 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import check_bits
from .quest_triton import interpreting
from .triton_lib import launch_opts, pack_rows_store


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
def _unpack_kernel(packed_ptr, out_ptr, n_codes, n_bytes, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """Codes pid*BLOCK .. : read the (one or two) bytes holding each code's bits."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < n_codes
    bit = i * BITS
    lo = tl.load(packed_ptr + bit // 8, mask=live, other=0).to(tl.int32)
    hi = tl.load(packed_ptr + bit // 8 + 1, mask=live & (bit // 8 + 1 < n_bytes), other=0)
    word = lo | (hi.to(tl.int32) << 8)
    k = (word >> (bit % 8).to(tl.int32)) & ((1 << BITS) - 1)
    tl.store(out_ptr + i, k.to(tl.uint8), mask=live)


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
        block = _block()
        if interpreting():
            block = min(block, 1 << max(0, (n_codes - 1).bit_length()))
        grid = (triton.cdiv(n_codes, block),)
        _unpack_kernel[grid](flat, out, n_codes, flat.numel(), BLOCK=block, BITS=bits,
                             **launch_opts())  # fmt: skip
    return out
