"""CAGE optimizers: CageAdamW (AdamW + correction) and CageCoupled (around any optimizer)."""

from .cage_adamw import CageAdamW
from .coupled import CageCoupled
from .quant_ops import DenseQuantOps, TensorQuantOps, quantizer_from_group
from .schedule import lambda_at

__all__ = [
    "CageAdamW",
    "CageCoupled",
    "DenseQuantOps",
    "TensorQuantOps",
    "lambda_at",
    "quantizer_from_group",
]
