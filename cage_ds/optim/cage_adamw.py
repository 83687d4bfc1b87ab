"""CageAdamW: torch.optim.AdamW plus the CAGE correction (cage-method.md section 2).

Per parameter with gradient g at its own step k (1-based), ops = self.quant_ops(group, W):
    ops.fused_step(W, g, m, v, ..., lam = lambda_at(k, ...))   one kernel pass, when the
                                                               ops have it and can, else
    g <- ops.ste_grad(W, g);  cage_adamw_update(..., lam, error_fn = ops.error)
ops is None for params whose group has "quant": None, so they get plain AdamW.
Group keys: lr, betas, eps, weight_decay, cage_lambda, cage_silence, cage_schedule,
cage_variant, total_steps, quant (QuantSpec fields as a plain dict, or None).
Per-param state: step (scalar fp32 tensor), exp_avg, exp_avg_sq, as torch.optim.AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from cage_kernels.adamw_update import VARIANTS, cage_adamw_update

from .quant_ops import (
    DenseQuantOps,
    QuantOpsFn,
    TensorQuantOps,
    dense_quant_ops,
    quant_spec_from_group,
)
from .schedule import check_schedule, lambda_at


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_adamw_group(group: Mapping[str, Any], where: str) -> None:
    """Raise naming ``where`` and the value if a CageAdamW group setting is invalid."""
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not _is_number(lr) or lr < 0:
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    if not _is_number(eps) or eps < 0:
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    if not _is_number(wd) or wd < 0:
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {wd!r}")
    check_cage_group(group, where)
    if group["cage_variant"] not in VARIANTS:
        raise ValueError(
            f"{where}: cage_variant must be one of {VARIANTS}, got {group['cage_variant']!r}"
        )


def check_cage_group(group: Mapping[str, Any], where: str) -> None:
    """Validate a group's lambda schedule and "quant" entry, naming ``where``."""
    try:
        check_schedule(
            group["cage_lambda"],
            group["cage_silence"],
            group["cage_schedule"],
            group["total_steps"],
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    quant_spec_from_group(group.get("quant"), where)


def group_lambda(group: Mapping[str, Any], k: int) -> float:
    """lambda_k of the group's schedule at the 1-based step k."""
    return lambda_at(
        k, group["cage_lambda"], group["cage_silence"], group["cage_schedule"], group["total_steps"]
    )


def describe_params(param_groups: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """id(p) -> 'param group i, param j' (plus its name when the group has param_names)."""
    out: dict[int, str] = {}
    for gi, group in enumerate(param_groups):
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            label = f"param group {gi}, param {pi}"
            out[id(p)] = f"{label} ({names[pi]!r})" if names else label
    return out


class CageAdamW(torch.optim.Optimizer):
    """AdamW with the CAGE correction on parameters whose group carries a "quant" spec.

    With cage_lambda = 0 this is torch.optim.AdamW (single-tensor path), op for op.
    ``last_lambda``: the largest lambda_k applied to a quantized parameter by the last step()
    that updated one (a ZeRO-3 sub-group without quantized weights leaves it unchanged).

    next_lr_ratio: the official code's order, where the scheduler steps between the Adam
    step and the decoupled correction, so the correction uses the next step's lr:
    W <- W' - lr_{k+1} lambda_k e. Given as k -> lr_{k+1} / lr_k of the lr schedule, it scales
    lambda_k (what ``last_lambda`` reports too); None (default) = this step's lr, as
    cage-method.md section 2. Refused with cage_variant "coupled" (no lr in its correction).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        cage_lambda: float = 10.0,
        cage_silence: float = 0.8,
        cage_schedule: str = "linear_ramp",
        cage_variant: str = "decoupled",
        total_steps: int | None = None,
        next_lr_ratio: Callable[[int], float] | None = None,
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "cage_lambda": cage_lambda,
            "cage_silence": cage_silence,
            "cage_schedule": cage_schedule,
            "cage_variant": cage_variant,
            "total_steps": total_steps,
            "quant": None,
        }
        check_adamw_group(defaults, "CageAdamW")
        self.next_lr_ratio = next_lr_ratio
        self._labels: dict[int, str] = {}
        self._provider: QuantOpsFn | None = None
        self._ops: dict[int, tuple[tuple | None, TensorQuantOps | None]] = {}
        super().__init__(params, defaults)
        self.last_lambda = 0.0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, after validating the group's settings (defaults filled in)."""
        merged = {**self.defaults, **param_group}
        where = f"CageAdamW param group {len(self.param_groups)}"
        check_adamw_group(merged, where)
        if self.next_lr_ratio is not None and merged["cage_variant"] == "coupled":
            raise ValueError(
                f"{where}: next_lr_ratio (the correction at the next step's lr) applies to the "
                "decoupled correction only, not to cage_variant='coupled'"
            )
        super().add_param_group(param_group)
        self._labels = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict (group keys restored as saved), after validating them."""
        for gi, group in enumerate(state_dict["param_groups"]):
            check_adamw_group({**self.defaults, **group}, f"CageAdamW param group {gi} (loaded)")
        super().load_state_dict(state_dict)
        self._labels = {}

    def describe_param(self, p: torch.Tensor) -> str:
        """'CageAdamW param group i, param j (name)' for error messages."""
        if id(p) not in self._labels:
            self._labels = describe_params(self.param_groups)
        return f"CageAdamW {self._labels.get(id(p), 'unregistered param')}"

    def set_quant_ops(self, provider: QuantOpsFn | None) -> None:
        """Route quant_ops(group, p) to ``provider``: the seam a sharding adapter (cage_ds.zero,
        cage_ds.fsdp) uses for the shards it hands this optimizer; None restores dense ops."""
        self._provider = provider
        self._ops.clear()

    def quant_ops(self, group: dict[str, Any], p: torch.Tensor) -> TensorQuantOps | None:
        """Quantization ops of p (None when its group has no "quant" and no provider serves
        it): the provider's if one is set, else DenseQuantOps of the whole weight; built once
        per parameter and "quant" spec."""
        quant = group.get("quant")
        key = None if quant is None else tuple(sorted(quant.items()))
        cached = self._ops.get(id(p))
        if cached is None or cached[0] != key:
            build = self._provider or self._dense_quant_ops
            cached = self._ops[id(p)] = (key, build(group, p))
        return cached[1]

    def _dense_quant_ops(self, group: dict[str, Any], p: torch.Tensor) -> DenseQuantOps | None:
        return dense_quant_ops(group, p, self.describe_param(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One CAGE-AdamW update of every parameter with a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        applied: list[float] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{self.describe_param(p)}: CageAdamW does not support sparse gradients"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                k = int(state["step"].item())
                ops = self.quant_ops(group, p)
                lam = 0.0
                if ops is not None:
                    lam = group_lambda(group, k)
                    if lam and self.next_lr_ratio is not None:
                        lam *= self.next_lr_ratio(k)
                    applied.append(lam)
                hyper = dict(
                    step=k,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    lam=lam,
                    variant=group["cage_variant"],
                )
                moments = (state["exp_avg"], state["exp_avg_sq"])
                fused_step = getattr(ops, "fused_step", None)
                if fused_step is not None and fused_step(p, p.grad, *moments, **hyper):
                    continue
                cage_adamw_update(
                    p,
                    p.grad if ops is None else ops.ste_grad(p, p.grad),
                    *moments,
                    error_fn=None if ops is None else ops.error,
                    **hyper,
                )
        if applied:
            self.last_lambda = max(applied)
        return loss
