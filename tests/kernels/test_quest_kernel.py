"""Triton QuEST row quantization vs quest_quantize_ref: codes, masks, values bit-identical.

The kernel reproduces the twin op for op (butterfly Hadamard, div_rn, floor-built
half-to-even rounding) with an IEEE square root where torch's CPU sqrt may be 1 ulp off
(kernel_oracles): every output equals the twin's grid functions at the IEEE step exactly,
equals quest_quantize_ref exactly in every row whose step agrees, and the step agrees with
the twin's within 6u (u = 2^-24; derivation in assert_matches_twin_where_steps_agree).
Without statistics the kernel takes the fixed-order tree sum (row_sumsq_tree_ref); torch.sum
differs from it by at most 2 n u relative (two fp32 summations of n positive terms), halved
by the square root, plus the 6u above: the twin's step lies within (n + 6) u D.
"""

from __future__ import annotations

import pytest
import torch
from cage_kernels.pack import pack_ref
from cage_kernels.quest import quest_quantize_ref
from cage_kernels.quest_packed import QuestPacked
from cage_kernels.quest_triton import quest_quantize_packed_triton, quest_quantize_triton
from cage_kernels.sumsq import row_sumsq_tree_ref
from kernel_oracles import U, as_bytes, assert_same, expected_quest

pytestmark = pytest.mark.interpret

# (rows, n, block): odd row counts, rows not multiples of the tile, non-power-of-two n.
SHAPES = [(37, 384, 128), (5, 640, 128), (1, 96, 32), (130, 192, 64)]


def assert_matches_twin_where_steps_agree(out, ref) -> int:
    """Rows with the twin's step: all outputs identical. Others: rms differs by 1 ulp (2u
    relative), and each of the two correctly rounded ops after it (x alpha, then 2x / (2^b-1))
    adds at most 2u between the two paths: |dD| <= 6u D."""
    k_step = out.step.cpu()
    same = (k_step == ref.step).flatten()
    assert ((k_step - ref.step).abs() <= 6 * U * ref.step).all()
    for name in ("values", "codes", "mask"):
        k, r = getattr(out, name).cpu()[same], getattr(ref, name)[same]
        assert torch.equal(as_bytes(k) if k.dtype == torch.bool else k,
                           as_bytes(r) if r.dtype == torch.bool else r), name  # fmt: skip
    return int(same.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quest_rows_match_reference_given_sumsq(gen, dev, dtype, bits):
    agree = total = 0
    for rows, n, block in SHAPES:
        x = (torch.randn(rows, n, generator=gen) * torch.rand(rows, 1, generator=gen) * 3).to(dtype)
        sumsq = row_sumsq_tree_ref(x)
        for rule in ("trust", "clip"):
            out = quest_quantize_triton(x.to(dev), bits, block, sumsq.to(dev), rule)
            assert_same(out, expected_quest(x, bits, block, sumsq, rule))
            ref = quest_quantize_ref(x, bits, block, sumsq, rule)
            agree += assert_matches_twin_where_steps_agree(out, ref)
            total += rows
        # Already-rotated input: statistics of y itself, no rotation in the kernel.
        out = quest_quantize_triton(x.to(dev), bits, block, None, "trust", rotated=True)
        assert_same(out, expected_quest(x, bits, block, None, "trust", rotated=True))
    assert agree >= 0.8 * total, f"only {agree} of {total} rows share the twin's step"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quest_rows_in_kernel_statistics(gen, dev, bits):
    rows, n, block = 37, 640, 128
    x = torch.randn(rows, n, generator=gen) * 2
    out = quest_quantize_triton(x.to(dev), bits, block)
    assert_same(out, expected_quest(x, bits, block))  # tree statistics of x
    # the CPU twin takes the same tree statistics: equal steps
    assert torch.equal(out.step.cpu(), quest_quantize_ref(x, bits, block).step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quest_packed_matches_reference(gen, dev, dtype, bits):
    for rows, n, block in SHAPES:
        x = torch.randn(rows, n, generator=gen).to(dtype)
        sumsq = row_sumsq_tree_ref(x)
        e = expected_quest(x, bits, block, sumsq)
        mask_bits = pack_ref(e.mask.to(torch.uint8), 1)
        packed = QuestPacked(e.values, pack_ref(e.codes, bits), e.step, mask_bits)
        assert_same(quest_quantize_packed_triton(x.to(dev), bits, block, sumsq.to(dev)), packed)


def test_quest_kernel_rejects_bad_input(dev):
    x = torch.randn(4, 96, device=dev)
    with pytest.raises(ValueError, match="hadamard block 64 does not divide"):
        quest_quantize_triton(x, 4, 64)
    with pytest.raises(ValueError, match="bits"):
        quest_quantize_triton(x, 9, 32)
    with pytest.raises(ValueError, match="one value per row"):
        quest_quantize_triton(x, 4, 32, torch.ones(3, 1, device=dev))
    with pytest.raises(ValueError, match="divisible by 8"):
        quest_quantize_packed_triton(torch.randn(4, 12, device=dev), 4, 4)
