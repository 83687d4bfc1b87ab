"""Row sums of squares in a fixed pairwise order: the statistic every kernel reproduces exactly.

s[r] = sum_j x[r, j]^2 in fp32, computed by zero-padding the row to a power of two and
repeatedly adding the right half onto the left half. The order is fixed and
device-independent, so a Triton kernel (``triton_lib.tree_row_sum``) and this twin agree
bit-for-bit; ``torch.sum``'s order is not specified and differs by ulps.
"""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def row_sumsq_tree_ref(x: torch.Tensor) -> torch.Tensor:
    """[rows, n] -> [rows, 1] fp32: pairwise halving sum of x^2 (see module docstring)."""
    s = x.float().square()
    n = s.shape[-1]
    width = next_pow2(n)
    if width > n:
        s = torch.nn.functional.pad(s, (0, width - n))
    while width > 1:
        width //= 2
        s = s[..., :width] + s[..., width:]
    return s
