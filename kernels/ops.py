"""Public ops, dispatched per device (see dispatch.py). Shapes are in each docstring.

Each op runs its Triton kernel for CUDA tensors (and CPU tensors under
CAGE_TRITON_INTERPRET=1), else its torch twin. Triton modules are imported on first use,
so the torch path works where triton is not installed. Every op runs inside a
``cage_kernels.<op>`` profiler range while torch.profiler records (profiling.py).
"""

from __future__ import annotations

import torch

from .cage_adamw_ref import cage_adamw_shard_ref, quest_shard_quantize_ref
from .dispatch import use_triton, use_triton_float
from .grid import check_bits, grid_values
from .hadamard import fwht_ref
from .pack import pack_ref, unpack_ref
from .profiling import profiled
from .quest import QuestOut, quest_quantize_ref
from .quest_act import masked_unrotate, quest_act_forward
from .quest_packed import QuestPacked, quest_quantize_packed_ref
from .rtn import RtnOut, rtn_quantize_ref
from .segments import SegmentTable


@profiled
def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] -> x (I ⊗ H_block), orthonormal block Hadamard along the last dim."""
    if use_triton_float(x):
        from .hadamard_triton import fwht_triton

        return fwht_triton(x, block)
    return fwht_ref(x, block)


@profiled
def quest_quantize(
    x: torch.Tensor,
    bits: int,
    block: int,
    sumsq: torch.Tensor | None = None,
    mask_rule: str = "trust",
    rotated: bool = False,
) -> QuestOut:
    """x [rows, n] -> QuestOut(values, codes, step [rows, 1], mask), rotated domain.

    Without sumsq the Triton path takes tree-order row statistics (ulps from torch.sum).
    """
    if use_triton_float(x):
        from .quest_triton import quest_quantize_triton

        return quest_quantize_triton(x, bits, block, sumsq, mask_rule, rotated)
    return quest_quantize_ref(x, bits, block, sumsq, mask_rule, rotated)


@profiled
def quest_quantize_packed(
    x: torch.Tensor,
    bits: int,
    block: int,
    sumsq: torch.Tensor | None = None,
    mask_rule: str = "trust",
    rotated: bool = False,
) -> QuestPacked:
    """x [rows, n] -> QuestPacked(values [rows, n], codes uint8 [rows, n b/8],
    step [rows, 1], mask bits uint8 [rows, n/8]); one pass on Triton (n % 8 == 0)."""
    if use_triton_float(x):
        from .quest_triton import quest_quantize_packed_triton

        return quest_quantize_packed_triton(x, bits, block, sumsq, mask_rule, rotated)
    return quest_quantize_packed_ref(x, bits, block, sumsq, mask_rule, rotated)


@profiled
def quest_act(
    x: torch.Tensor, bits: int, block: int, mask_rule: str = "trust"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] -> (q(x H) x.dtype, mask bool), both [rows, n]: one kernel, no codes written.

    Row scale from x (as quest_quantize). Pair with quest_act_backward in an autograd
    Function (cage_ds.quant.Quantizer.fake).
    """
    check_bits(bits)
    out = quest_act_forward(x, bits, block, mask_rule)
    return out.values, out.mask


@profiled
def quest_act_backward(grad: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """Backward half of quest_act: (grad ⊙ mask) H^T, grad / mask [..., n]."""
    return masked_unrotate(grad.contiguous(), mask, block)


@profiled
def rtn_quantize(x: torch.Tensor, bits: int, group: int) -> RtnOut:
    """x [..., n] -> RtnOut(values, codes, scale [..., n // group])."""
    return rtn_quantize_ref(x, bits, group)


@profiled
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] -> uint8 [..., n * bits / 8]."""
    if use_triton(codes):
        from .pack_triton import pack_triton

        return pack_triton(codes, bits)
    return pack_ref(codes, bits)


@profiled
def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., m] -> uint8 codes [..., m * 8 / bits]."""
    if use_triton(packed):
        from .pack_triton import unpack_triton

        return unpack_triton(packed, bits)
    return unpack_ref(packed, bits)


@profiled
def dequantize(
    codes: torch.Tensor, step: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes uint8 [rows, n], step fp32 [rows, 1] -> (codes - (2^b-1)/2) step [rows, n] in dtype."""
    if use_triton(codes):
        from .dequant_triton import dequantize_triton

        return dequantize_triton(codes, step, bits, dtype)
    return grid_values(codes, step, check_bits(bits)).to(dtype)


@profiled
def cage_adamw_shard_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    lam: float,
    variant: str,
    qout: torch.Tensor | None = None,
    mask_out: torch.Tensor | None = None,
    mask_in: torch.Tensor | None = None,
) -> None:
    """One CAGE-AdamW step over the whole rows a flat fp32 shard holds (segments.py), in place.

    param, grad, exp_avg, exp_avg_sq: fp32 [L]; qout: [L] in the compute dtype or None,
    receives q(W H) (quantized segments, rotated domain) or W; mask_out: bool [L] or None,
    receives the STE mask of that q(W H) (True on unquantized segments); elements no segment
    covers are untouched. mask_in: bool [L] or None, the STE mask of q(W H) of the current W
    (the previous step's mask_out, when W has not changed since; it may be the mask_out
    buffer itself): STE segments then skip quantizing W for it.
    """
    kw = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              lam=lam, variant=variant, qout=qout, mask_out=mask_out,
              mask_in=mask_in)  # fmt: skip
    if use_triton(param):
        from .cage_adamw_triton import cage_adamw_shard_triton

        return cage_adamw_shard_triton(param, grad, exp_avg, exp_avg_sq, table, **kw)
    return cage_adamw_shard_ref(param, grad, exp_avg, exp_avg_sq, table, **kw)


@profiled
def quest_shard_quantize(
    param: torch.Tensor,
    table: SegmentTable,
    qout: torch.Tensor,
    mask_out: torch.Tensor | None = None,
) -> None:
    """qout [L] <- q(W H) (quantized segments, rotated domain) or W, and mask_out (bool [L] or
    None) <- its STE mask, for the whole rows a flat fp32 shard param [L] holds: the
    low-precision copy without an update (checkpoint load)."""
    if use_triton(param):
        from .cage_adamw_triton import quest_shard_quantize_triton

        return quest_shard_quantize_triton(param, table, qout, mask_out)
    return quest_shard_quantize_ref(param, table, qout, mask_out)
