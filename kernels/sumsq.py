"""Row sums of squares in a fixed order: the statistic every kernel reproduces exactly.

s[r] = sum_j x[r, j]^2 in fp32. The row is zero-padded to a power of two N (zeros add
exactly) and viewed as [H, W, L, V] (``tree_dims``): element j = ((h W + w) L + l) V + v
sits, in a compiled program of W warps that loads V elements (16 bytes) per access, in
register (h, v) of lane l of warp w. The sum halves V, then H (adds inside a thread), then
L (shuffles across the lanes of a warp), then W (across warps), each halving adding the
upper half onto the lower half, so no element moves between threads before it is summed.
The order is fixed per (N, x's element size) and device-independent, so a Triton kernel
(``triton_lib.tree_row_sum``) and this twin agree bit-for-bit; ``torch.sum``'s order is not
specified and differs by ulps.
"""

from __future__ import annotations

import torch

LANES = 32  # threads of a warp


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def row_warps(width: int) -> int:
    """Warps of a compiled program holding one row of ``width`` (a power of two) elements:
    4 up to 1K elements, 8 up to 4K, 16 above (the fewest spills on sm_90a)."""
    return 4 if width <= 1024 else 8 if width <= 4096 else 16


def tree_dims(width: int, itemsize: int) -> tuple[int, int, int, int]:
    """(H, W, L, V) with H W L V = width: the tree view of a row of ``itemsize``-byte elements."""
    vector = min(16 // itemsize, width)
    lanes = min(LANES, width // vector)
    warps = min(row_warps(width), width // (vector * lanes))
    return width // (warps * lanes * vector), warps, lanes, vector


def row_sumsq_tree_ref(x: torch.Tensor) -> torch.Tensor:
    """[rows, n] -> [rows, 1] fp32: the fixed-order sum of x^2 (module docstring), the tree
    view taken from x's own element size."""
    s = x.float().square()
    rows, n = s.shape
    width = next_pow2(n)
    if width > n:
        s = torch.nn.functional.pad(s, (0, width - n))
    s = s.reshape(rows, *tree_dims(width, x.element_size()))
    for dim in (4, 1, 3, 2):  # V, H, L, W
        while s.shape[dim] > 1:
            lo, hi = s.split(s.shape[dim] // 2, dim)
            s = lo + hi
    return s.reshape(rows, 1)
