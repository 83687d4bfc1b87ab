"""Integrations above cage_ds.zero (nothing below imports this package)."""

from .hf_trainer import CageArgs, CageTrainer

__all__ = ["CageArgs", "CageTrainer"]
