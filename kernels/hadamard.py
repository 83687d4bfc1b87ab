"""Block-diagonal orthonormal Walsh-Hadamard rotation along the last dimension.

H_B is the Sylvester matrix ([[H, H], [H, -H]] recursively) scaled by B^-1/2; it is
symmetric and orthonormal, so H^-1 = H^T = H and the same op rotates and un-rotates.
The reference is a butterfly of adds and subtracts (then one scale), so every block's
result is bit-identical wherever and in whatever batch it is computed: sharded and
unsharded paths agree exactly on the rotation.
"""

from __future__ import annotations

import math

import torch


def check_block(block: object, row_len: int | None = None) -> int:
    """Return ``block`` if it is a power of two (dividing row_len, if given), else raise."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"hadamard block must be a power of two, got {block!r}")
    if row_len is not None and row_len % block:
        raise ValueError(f"hadamard block {block} does not divide the row length {row_len}")
    return block


def hadamard_matrix(block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [block, block] (the float64 oracle)."""
    check_block(block)
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(block)


def fwht_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """y = x (I ⊗ H_block) along the last dim; fp32 math for low-precision input, same dtype out.

    x: [..., n] with n % block == 0.
    """
    check_block(block, x.shape[-1])
    out_dtype = x.dtype
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    lead = work.shape[:-1]
    y = work.reshape(-1, block)
    h = 1
    while h < block:
        y = y.view(-1, block // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(*lead, x.shape[-1]) * (1.0 / math.sqrt(block))
    return y.to(out_dtype)
