"""Integrations above cage_ds.zero (nothing below imports this package)."""

from .accelerate import CageAccelerator
from .hf_trainer import CageArgs, CageTrainer

__all__ = ["CageAccelerator", "CageArgs", "CageTrainer"]
