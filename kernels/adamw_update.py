"""One CAGE-AdamW update of a tensor (a whole parameter or a flat shard), in place.

The one home of the update math: cage_ds.optim.CageAdamW and the fused kernel's torch twin
(cage_adamw_ref) both call it.

    coupled:   g <- g + lambda * (W - Q(W))
    W <- W (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
    W <- W - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    decoupled: W <- W - lr lambda (W - Q(W))     (Q recomputed on the updated W)

``error_fn(W) -> W - Q(W)`` supplies the quantization error of exactly this tensor; a
sharded caller passes one that knows the shard's rows and Hadamard blocks. With lambda = 0
(or error_fn None) this is torch.optim.AdamW's update, operation for operation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ErrorFn = Callable[[torch.Tensor], torch.Tensor]
VARIANTS = ("decoupled", "coupled")


def cage_adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    lam: float,
    variant: str,
    error_fn: ErrorFn | None,
) -> None:
    """Apply one update to param, exp_avg, exp_avg_sq in place (see module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"cage_variant must be one of {VARIANTS}, got {variant!r}")
    correct = lam > 0 and error_fn is not None
    if correct and variant == "coupled":
        grad = grad.add(error_fn(param), alpha=lam)
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)
    if correct and variant == "decoupled":
        param.add_(error_fn(param), alpha=-lr * lam)
