"""The run's schedules, resolved from its config: steps, learning rates and the CAGE lambda.

lr_t = lr * t / W for t <= W, else lr * (m + (1 - m) (1 + cos(pi (t - W) / (T - W))) / 2),
t = 1-based step, T = total steps, W = ceil(warmup_fraction T), m = min_lr_ratio.
The CAGE lambda is optim.cage_lambda, or, with optim.cage_strength = S, the lambda whose
schedule on these lr_t (lr_{t+1} with optim.cage_lr_order = "next") gives
sum_t lr_t lambda_t = S (cage_ds.optim.schedule); it is 0 when the run trains fewer tokens
per non-embedding parameter than optim.cage_min_tokens_per_param.
max_t lr_t lambda_t must stay well below 1: at 1 the decoupled step W - lr lambda (W - Q(W))
would overshoot the grid point.
"""

from __future__ import annotations

import math

from cage_ds.optim.schedule import lambda_for_strength, peak_pull

from .config import Config, ConfigError
from .data import steps_for_tokens
from .model import preset_parameter_counts

MAX_PEAK_PULL = 0.5
"""Largest lr_t lambda_t accepted: well below the overshoot at 1 (cage-method.md: lr lambda
<< 1)."""


def warmup_cosine(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """lr multiplier of the 1-based step (module docstring)."""
    warmup = math.ceil(warmup_fraction * total)
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def next_lr_ratio(total: int, warmup_fraction: float, min_ratio: float, step: int) -> float:
    """lr_{k+1} / lr_k of warmup_cosine at the 1-based step k (0 where lr_k is 0: the end of
    a schedule decaying to 0, where lr_{k+1} is 0 too)."""
    now = warmup_cosine(step, total, warmup_fraction, min_ratio)
    return warmup_cosine(step + 1, total, warmup_fraction, min_ratio) / now if now > 0 else 0.0


def total_steps(cfg: Config) -> int:
    """train.steps, or the steps that give tokens_per_param tokens per non-embedding parameter."""
    if cfg.train.tokens_per_param is None:
        return cfg.train.steps
    params = preset_parameter_counts(cfg.model)["non_embedding"]
    return steps_for_tokens(
        cfg.train.tokens_per_param * params, cfg.train.global_batch_size, cfg.data.seq_len
    )


def learning_rates(cfg: Config, steps: int) -> list[float]:
    """The lr of each step's decoupled correction, t = 1..steps: lr_t, or lr_{t+1} with
    optim.cage_lr_order = "next"."""
    o = cfg.optim
    shift = int(o.cage_lr_order == "next")
    return [o.lr * warmup_cosine(t + shift, steps, o.warmup_fraction, o.min_lr_ratio)
            for t in range(1, steps + 1)]  # fmt: skip


def tokens_per_param(cfg: Config, steps: int) -> float:
    """Training tokens per non-embedding parameter of the run."""
    params = preset_parameter_counts(cfg.model)["non_embedding"]
    return steps * cfg.train.global_batch_size * cfg.data.seq_len / params


def cage_off_reason(cfg: Config, steps: int) -> str | None:
    """Why a CAGE config's correction is off for this run (too few tokens per parameter), or
    None when it acts."""
    floor = cfg.optim.cage_min_tokens_per_param
    if not cfg.optim.uses_cage or floor is None:
        return None
    tpp = tokens_per_param(cfg, steps)
    if tpp >= floor:
        return None
    return (
        f"CAGE correction off: {steps} steps train {tpp:.2f} tokens per non-embedding parameter, "
        f"below optim.cage_min_tokens_per_param={floor} (where the accuracy study measured the "
        "correction costing accuracy, docs/accuracy_study.md); the run is QuEST. Set "
        "optim.cage_min_tokens_per_param=null to apply it anyway"
    )


def resolve_cage_lambda(cfg: Config, steps: int) -> float:
    """The run's lambda (module docstring); ConfigError if unreachable or unstable."""
    o = cfg.optim
    if not o.uses_cage or cage_off_reason(cfg, steps) is not None:
        return 0.0
    lrs = learning_rates(cfg, steps)
    lam = o.cage_lambda
    if o.cage_strength is not None:
        try:
            lam = lambda_for_strength(o.cage_strength, lrs, o.cage_silence, o.cage_schedule)
        except ValueError as err:
            raise ConfigError(f"optim: {err}") from None
    peak = peak_pull(lrs, lam, o.cage_silence, o.cage_schedule)
    if o.cage_variant == "decoupled" and peak > MAX_PEAK_PULL:
        source = (f"optim.cage_strength={o.cage_strength} resolves to lambda={lam:.4g}"
                  if o.cage_strength is not None else f"optim.cage_lambda={lam}")  # fmt: skip
        raise ConfigError(
            f"{source}: max_t lr_t lambda_t = {peak:.3g} over {steps} steps exceeds "
            f"{MAX_PEAK_PULL} (the correction would overshoot the grid); lower it or lengthen "
            "the run"
        )
    return lam
