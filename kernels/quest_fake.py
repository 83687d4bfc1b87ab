"""Fake-quantization of activations with QuEST's STE, as one autograd op (QuantLinear's input).

forward:  y = x (I ⊗ H) rounded to x.dtype; q(y) with per-token statistics of y
backward: dL/dx = (M ⊙ dL/dq) (I ⊗ H)^T, M the trust / clip mask, H^T = H
The torch twin is exactly Quantizer.fake's path (fwht_ref, then quest_quantize_ref on the
rotated rows, torch.sum statistics); the Triton path fuses rotate + statistics + quantize
into one kernel (tree-order statistics: step can differ from the twin's by ulps) and the
backward into one masked-rotation kernel.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton_float
from .hadamard import fwht_ref
from .quest import quest_quantize_ref


def quest_act_forward(
    rows: torch.Tensor, bits: int, block: int, mask_rule: str, stats_of_rotated: bool = True
):
    """rows [rows, n] -> QuestOut with values and mask (codes may be None on Triton).

    stats_of_rotated: row scale from y = x H rounded to x.dtype (Quantizer.fake) or, False,
    from x (quest_quantize_ref / QuantLinear); equal in exact arithmetic.
    """
    if use_triton_float(rows):
        from .quest_triton import quest_quantize_triton

        return quest_quantize_triton(
            rows, bits, block, None, mask_rule, stats_of_rotated=stats_of_rotated, with_codes=False
        )
    if stats_of_rotated:
        return quest_quantize_ref(fwht_ref(rows, block), bits, block, None, mask_rule, rotated=True)
    return quest_quantize_ref(rows, bits, block, None, mask_rule)


def masked_unrotate(grad: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """(grad ⊙ mask) (I ⊗ H): the STE backward through q and the rotation."""
    if use_triton_float(grad):
        from .hadamard_triton import fwht_triton

        return fwht_triton(grad, block, mask)
    return fwht_ref(grad * mask, block)


class QuestFake(torch.autograd.Function):
    """x [..., n] -> q(x H) [..., n] (rotated domain) with the masked STE backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int, block: int, mask_rule: str) -> torch.Tensor:
        out = quest_act_forward(x.reshape(-1, x.shape[-1]), bits, block, mask_rule)
        ctx.block = block
        ctx.save_for_backward(out.mask.view(x.shape))
        return out.values.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return masked_unrotate(grad.contiguous(), mask, ctx.block), None, None, None
