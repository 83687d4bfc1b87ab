"""Pack b-bit integer codes into uint8 bytes and back (little-endian bit order).

Codes are laid out as one bit stream: code i occupies bits [i*b, (i+1)*b) of the stream,
bit j of the stream is bit (j % 8) of byte j // 8. The last dim is packed; its length times
b must be a multiple of 8.
"""

from __future__ import annotations

import torch

from .grid import check_bits


def pack_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (values < 2^b) -> uint8 [..., n * b / 8]."""
    check_bits(bits)
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into whole bytes")
    shifts = torch.arange(bits, device=codes.device)
    stream = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., n, b]
    stream = stream.reshape(*codes.shape[:-1], n * bits // 8, 8)
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_ref(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., m] -> uint8 codes [..., m * 8 / b]."""
    check_bits(bits)
    m = packed.shape[-1]
    if (m * 8) % bits:
        raise ValueError(f"{m} bytes do not hold a whole number of {bits}-bit codes")
    stream = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], m * 8 // bits, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)
