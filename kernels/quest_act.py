"""QuEST fake-quantization of rows with its STE backward, as a forward/backward op pair.

forward:  q(x H) and the mask M, row scale from x's own statistics (as quest_quantize)
backward: dL/dx = (M ⊙ dL/dq) (I ⊗ H)^T, H^T = H
On Triton the forward is one kernel (rotate + statistics + quantize, no codes written) and the
backward one masked-rotation kernel; the torch twins are quest_quantize_ref and fwht_ref.
cage_ds.quant.Quantizer.fake wraps the pair in an autograd Function.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton_float
from .hadamard import fwht_ref
from .quest import QuestOut, quest_quantize_ref


def quest_act_forward(rows: torch.Tensor, bits: int, block: int, mask_rule: str) -> QuestOut:
    """rows [rows, n] -> QuestOut with values and mask (codes may be None on Triton)."""
    if use_triton_float(rows):
        from .quest_triton import quest_quantize_triton

        return quest_quantize_triton(rows, bits, block, None, mask_rule, with_codes=False)
    return quest_quantize_ref(rows, bits, block, None, mask_rule)


def masked_unrotate(grad: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """(grad ⊙ mask) (I ⊗ H): the STE backward through q and the rotation."""
    if use_triton_float(grad):
        from .hadamard_triton import fwht_triton

        return fwht_triton(grad, block, mask)
    return fwht_ref(grad * mask, block)
