"""The CAGE lambda schedule.

r = k / T (k = 1-based CAGE step, T = total steps), silence fraction s:
lambda_k = 0 for r <= s; else lambda * min(1, (r - s) / (1 - s)) ("linear_ramp") or lambda
("constant"). Official defaults: lambda = 10, s = 0.8, linear_ramp.

Strength: the decoupled step W <- W - lr_k lambda_k (W - Q(W)) shrinks the error by a factor
(1 - lr_k lambda_k) per step, so over a run the pull toward the grid is about exp(-S) with
    S = sum_k lr_k lambda_k        (k = 1..T).
lambda_k is linear in lambda, so the lambda that reaches a target S on a given lr schedule is
S / sum_k lr_k lambda_k(lambda = 1) (``lambda_for_strength``): a recipe written as S carries
over between run lengths, where a raw lambda's S grows with T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("linear_ramp", "constant")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_schedule(lam: float, silence: float, kind: str, total_steps: int | None) -> None:
    """Raise naming the offending value if the schedule settings are invalid."""
    if not _is_number(lam) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"cage_lambda must be a finite number >= 0, got {lam!r}")
    if not _is_number(silence) or not 0.0 <= silence <= 1.0:
        raise ValueError(f"cage_silence must lie in [0, 1], got {silence!r}")
    if kind not in SCHEDULES:
        raise ValueError(f"cage_schedule must be one of {SCHEDULES}, got {kind!r}")
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if lam > 0 and total_steps is None and silence > 0:
        raise ValueError("total_steps is required when cage_lambda > 0 and cage_silence > 0")


def strength(lrs: Sequence[float], lam: float, silence: float, kind: str) -> float:
    """S = sum_k lrs[k-1] lambda_k over a run of len(lrs) steps (module docstring)."""
    total = len(lrs)
    return sum(lr * lambda_at(k, lam, silence, kind, total) for k, lr in enumerate(lrs, 1))


def lambda_for_strength(target: float, lrs: Sequence[float], silence: float, kind: str) -> float:
    """The lambda whose schedule gives strength(lrs, lambda, silence, kind) == target."""
    if not _is_number(target) or not math.isfinite(target) or target < 0:
        raise ValueError(f"cage_strength must be a finite number >= 0, got {target!r}")
    unit = strength(lrs, 1.0, silence, kind)
    if target > 0 and unit <= 0:
        raise ValueError(
            f"cage_strength={target} cannot be reached: with cage_silence={silence} over "
            f"{len(lrs)} steps the correction never acts (or every lr is 0)"
        )
    return target / unit if target > 0 else 0.0


def peak_pull(lrs: Sequence[float], lam: float, silence: float, kind: str) -> float:
    """max_k lr_k lambda_k: the decoupled step overshoots Q(W) when this reaches 1."""
    total = len(lrs)
    return max((lr * lambda_at(k, lam, silence, kind, total) for k, lr in enumerate(lrs, 1)),
               default=0.0)  # fmt: skip


def lambda_at(k: int, lam: float, silence: float, kind: str, total_steps: int | None) -> float:
    """lambda_k for the 1-based step k (see module docstring)."""
    if lam == 0:
        return 0.0
    if total_steps is None:  # silence == 0: active from the first step
        return float(lam)
    r = min(k / total_steps, 1.0)  # steps past T keep the final value
    if r <= silence:
        return 0.0
    if kind == "constant":
        return float(lam)
    return float(lam) * min(1.0, (r - silence) / (1.0 - silence))
