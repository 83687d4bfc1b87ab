"""CageCoupled: the optimizer-agnostic (coupled) CAGE correction around any torch optimizer.

Before ``base.step()``, at CAGE step k (1-based, counted by this wrapper), for every
parameter p with a gradient whose ops = quant_ops(group, p) is not None:
    p.grad <- ops.ste_grad(p, p.grad) + lambda_k * (p - Q(p))
Default quant_ops: DenseQuantOps from the base optimizer's group key "quant" (QuantSpec
fields or None; torch optimizers keep extra group keys). p.grad is modified in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .cage_adamw import check_cage_group, describe_params, group_lambda
from .quant_ops import QuantOpsFn, TensorQuantOps, dense_quant_ops


class CageCoupled:
    """Wrap ``base`` so each step adds the coupled CAGE correction to the gradients.

    ``last_lambda`` is lambda_k of the last step; ``cage_step`` counts steps taken.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        quant_ops: QuantOpsFn | None = None,
        cage_lambda: float = 10.0,
        cage_silence: float = 0.8,
        cage_schedule: str = "linear_ramp",
        total_steps: int | None = None,
    ):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"CageCoupled wraps a torch.optim.Optimizer, got {type(base).__name__}")
        self.base = base
        self.schedule = {
            "cage_lambda": cage_lambda,
            "cage_silence": cage_silence,
            "cage_schedule": cage_schedule,
            "total_steps": total_steps,
        }
        for gi, group in enumerate(base.param_groups):
            check_cage_group(
                {**self.schedule, "quant": group.get("quant")}, f"CageCoupled param group {gi}"
            )
        self._quant_ops = quant_ops or self._dense_quant_ops
        self._labels: dict[int, str] = {}
        self.cage_step = 0
        self.last_lambda = 0.0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def _dense_quant_ops(self, group: dict[str, Any], p: torch.Tensor) -> TensorQuantOps | None:
        if group.get("quant") is None:
            return None
        if id(p) not in self._labels:
            self._labels = describe_params(self.base.param_groups)
        label = self._labels.get(id(p), "unregistered param")
        return dense_quant_ops(group, p, f"CageCoupled {label}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _correct_grads(self, lam: float) -> None:
        for group in self.base.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                ops = self._quant_ops(group, p)
                if ops is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"CageCoupled: a quantized parameter {tuple(p.shape)} has a sparse "
                        "gradient; the CAGE correction needs a dense one"
                    )
                grad = ops.ste_grad(p, p.grad)
                if lam > 0:
                    grad = grad.add(ops.error(p), alpha=lam)
                if grad is not p.grad:
                    p.grad.copy_(grad)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate closure (if any), correct the gradients, then ``base.step()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.cage_step += 1
        self.last_lambda = lambda_k = group_lambda(self.schedule, self.cage_step)
        self._correct_grads(lambda_k)
        self.base.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "cage_step": self.cage_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        self.cage_step = int(state_dict["cage_step"])
