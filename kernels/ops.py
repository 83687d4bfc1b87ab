"""Public ops, dispatched per device (see dispatch.py). Shapes are in each docstring."""

from __future__ import annotations

import torch

from .hadamard import fwht_ref
from .pack import pack_ref, unpack_ref
from .quest import QuestOut, quest_quantize_ref
from .rtn import RtnOut, rtn_quantize_ref


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] -> x (I ⊗ H_block), orthonormal block Hadamard along the last dim."""
    return fwht_ref(x, block)


def quest_quantize(
    x: torch.Tensor,
    bits: int,
    block: int,
    sumsq: torch.Tensor | None = None,
    mask_rule: str = "trust",
    rotated: bool = False,
) -> QuestOut:
    """x [rows, n] -> QuestOut(values, codes, step [rows, 1], mask), rotated domain."""
    return quest_quantize_ref(x, bits, block, sumsq, mask_rule, rotated)


def rtn_quantize(x: torch.Tensor, bits: int, group: int) -> RtnOut:
    """x [..., n] -> RtnOut(values, codes, scale [..., n // group])."""
    return rtn_quantize_ref(x, bits, group)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] -> uint8 [..., n * bits / 8]."""
    return pack_ref(codes, bits)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., m] -> uint8 codes [..., m * 8 / bits]."""
    return unpack_ref(packed, bits)
