"""QuEST quantization with packed outputs: what a weight copy stores or sends.

codes in b-bit fields (pack.pack_ref layout, [rows, n b / 8]) and the STE mask as 1-bit
fields ([rows, n / 8], bit j % 8 of byte j // 8 is element j): the torch twin of the Triton
kernel's PACK mode, composed of quest_quantize_ref and pack_ref.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .pack import pack_ref
from .quest import quest_quantize_ref


class QuestPacked(NamedTuple):
    """values [rows, n] x.dtype, codes uint8 [rows, n b / 8], step fp32 [rows, 1],
    mask uint8 [rows, n / 8] (one bit per element)."""

    values: torch.Tensor
    codes: torch.Tensor
    step: torch.Tensor
    mask: torch.Tensor


def quest_quantize_packed_ref(
    x: torch.Tensor,
    bits: int,
    block: int,
    sumsq: torch.Tensor | None = None,
    mask_rule: str = "trust",
    rotated: bool = False,
) -> QuestPacked:
    """quest_quantize_ref with codes packed into b-bit fields and the mask into bits."""
    out = quest_quantize_ref(x, bits, block, sumsq, mask_rule, rotated)
    mask_bits = pack_ref(out.mask.to(torch.uint8), 1)
    return QuestPacked(out.values, pack_ref(out.codes, bits), out.step, mask_bits)
