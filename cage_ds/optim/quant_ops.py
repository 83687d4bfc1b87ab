"""What the CAGE optimizers need to know about a quantized parameter.

A param group's ``"quant"`` entry is plain data (the fields of a QuantSpec, or None). For
each quantized tensor the optimizer asks for a ``TensorQuantOps``:
  error(w)       e = w - Q(w), Q(w) = q(w H) H^T (fresh row scales), same shape as w
  ste_grad(w, g) the gradient w.r.t. the latent w, given the gradient g it received
  fused_step(w, g, exp_avg, exp_avg_sq, **hyper)     (optional)
                 the whole CAGE-AdamW step in one kernel pass, in place, when these ops can
                 (True), else False and nothing done; hyper = cage_kernels.ops.
                 cage_adamw_shard_step's keywords (CageAdamW tries it first)
``DenseQuantOps`` serves an unsharded 2-D weight [out, in]; a sharded caller (the ZeRO
adapter) supplies its own ops for a flat partition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from cage_kernels import ops as kernel_ops
from cage_kernels.dispatch import use_triton
from cage_kernels.segments import Segment, SegmentTable

from cage_ds.quant import Quantizer, QuantSpec


@runtime_checkable
class TensorQuantOps(Protocol):
    """Quantization error and STE gradient of one tensor (see module docstring)."""

    def error(self, w: torch.Tensor) -> torch.Tensor: ...

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor: ...


QuantOpsFn = Callable[[dict[str, Any], torch.Tensor], "TensorQuantOps | None"]
"""quant_ops(group, p): the ops of a parameter (or shard) p of ``group``, None if unquantized."""


class DenseQuantOps:
    """Ops of a whole (unsharded) weight [out, in]: e = Quantizer.error(w); ste_grad = g.

    ste_grad is the identity because QuantLinear's fake-quant forward already applied the
    STE (mask and inverse rotation) when autograd produced g.
    """

    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer

    def __repr__(self) -> str:
        return f"DenseQuantOps({self.quantizer.spec})"

    def error(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantizer.error(w)

    def ste_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g

    def fused_step(
        self, w: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
        **hyper: Any,
    ) -> bool:  # fmt: skip
        """All of w [out, in] in one fused CAGE-AdamW pass (a one-segment table), when the
        kernels serve w (CUDA, or the interpreter) and the grid is QuEST; else False."""
        spec = self.quantizer.spec
        if spec.method != "quest" or w.dtype != torch.float32 or not w.is_contiguous():
            return False
        if not use_triton(w):
            return False
        rows, row_len = w.shape
        table = SegmentTable((Segment(0, 0, 0, rows, row_len, spec.bits),), spec.hadamard_block,
                             spec.mask)  # fmt: skip
        flat = [t.view(-1) for t in (w, g, exp_avg, exp_avg_sq)]
        kernel_ops.cage_adamw_shard_step(*flat, table, **hyper)
        return True


def quant_spec_from_group(quant: Any, where: str) -> QuantSpec | None:
    """QuantSpec(**quant) for a group's "quant" entry (None stays None); errors name ``where``."""
    if quant is None:
        return None
    if not isinstance(quant, Mapping):
        raise TypeError(
            f"{where}: 'quant' must be a dict of QuantSpec fields or None, got {quant!r}"
        )
    try:
        return QuantSpec(**quant)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid 'quant' {dict(quant)!r}: {err}") from err


def quantizer_from_group(quant: Mapping[str, Any], where: str = "param group") -> Quantizer:
    """A Quantizer built from a group's "quant" dict (QuantSpec fields)."""
    spec = quant_spec_from_group(quant, where)
    if spec is None:
        raise ValueError(f"{where}: 'quant' is None, so there is no quantizer to build")
    return Quantizer(spec)


def dense_quant_ops(group: Mapping[str, Any], p: torch.Tensor, where: str) -> DenseQuantOps | None:
    """DenseQuantOps for p if its group carries a "quant" spec, else None.

    p must be a 2-D weight [out, in] whose in-dim the spec can quantize; a 1-D p is what
    DeepSpeed ZeRO hands its client optimizer without cage_ds.zero, and the error says so.
    """
    quant = group.get("quant")
    if quant is None:
        return None
    quantizer = quantizer_from_group(quant, where)
    if p.dim() == 1:
        raise ValueError(
            f"{where}: got a flat 1-D tensor of shape {tuple(p.shape)} for a quantized param "
            "group: DeepSpeed handed CageAdamW a flat ZeRO partition, so the CAGE hooks are not "
            "attached (plain deepspeed.initialize, HF Trainer or accelerate). Build the engine "
            "with cage_ds.zero.initialize(model=..., optimizer=..., config=...), or call "
            "cage_ds.zero.attach(engine, optimizer) right after deepspeed.initialize; with the "
            "HF Trainer or accelerate use cage_ds.integrations.CageTrainer / CageAccelerator"
        )
    if p.dim() != 2:
        raise ValueError(
            f"{where}: a quantized parameter must be a 2-D weight [out, in], got shape "
            f"{tuple(p.shape)} (a sharded caller must override quant_ops)"
        )
    quantizer.spec.check_row_len(p.shape[1], where)
    return DenseQuantOps(quantizer)
