"""The QuEST integer grid: one home for the clip table and the rounding rule.

A b-bit grid has n = 2^b levels and no zero level. For a row with RMS r the clip is
c = ALPHA[b] * r, the step is D = 2c / (n - 1) and the levels are (k - (n-1)/2) * D for
integer codes k in [0, n), so the outermost levels are +-c. Rounding is half-to-even
(torch.round), the rule every kernel must reproduce.
"""

from __future__ import annotations

import torch

# MSE-optimal clip (in units of the RMS) of a standard Gaussian for a 2^b-level grid.
ALPHA: dict[int, float] = {
    1: 0.7979,
    2: 1.4935,
    3: 2.0511,
    4: 2.5139,
    5: 2.9161,
    6: 3.2766,
    7: 3.6010,
    8: 3.8849,
}

# Lower bound on a row's RMS so that an all-zero row gets a finite step.
RMS_FLOOR = 1e-12


def check_bits(bits: object) -> int:
    """Return ``bits`` if it is an int in ALPHA's range, else raise naming the value."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALPHA:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return bits


def grid_step(sumsq: torch.Tensor, row_len: int, bits: int) -> torch.Tensor:
    """D = 2 * ALPHA[b] * max(sqrt(sumsq / row_len), RMS_FLOOR) / (2^b - 1), in fp32.

    The sqrt is taken in float64 and rounded once to fp32: correctly rounded, as the kernels'
    sqrt_rn (torch's CPU fp32 sqrt can be 1 ulp off).
    """
    mean_sq = sumsq.float() / row_len
    rms = torch.sqrt(mean_sq.double()).float().clamp_min(RMS_FLOOR)
    clip = ALPHA[check_bits(bits)] * rms
    return 2.0 * clip / (2**bits - 1)


def grid_codes(y: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """k = round_half_even(clamp(y, -c, c) / D + h) as uint8, h = (n-1)/2; y, step broadcast,
    fp32. k needs no clamp to [0, n): c = RN(D h) and |clamp(y)| <= c give |RN(.. / D)| <=
    h (1 + 2^-22), so t lies within (n-1) 2^-21 of [0, n-1] and rounds into it."""
    half = (2**bits - 1) / 2.0
    clip = step * half
    t = torch.clamp(y, -clip, clip) / step + half
    return torch.round(t).to(torch.uint8)


def grid_values(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Level value (k - (n-1)/2) * D in fp32."""
    half = (2**bits - 1) / 2.0
    return (codes.float() - half) * step
