"""Triton fwht (plain and masked), pack, unpack, dequantize vs their torch twins: bit-identical.

All four are exact computations (adds/subtracts of the butterfly then one fp32 scale and one
round-to-nearest-even cast; bit shuffles; one subtract and multiply), so torch.equal.
"""

from __future__ import annotations

import pytest
import torch
from cage_kernels import ops
from cage_kernels.dequant_triton import dequantize_triton
from cage_kernels.grid import grid_values
from cage_kernels.hadamard import fwht_ref
from cage_kernels.hadamard_triton import fwht_triton
from cage_kernels.pack import pack_ref, unpack_ref
from cage_kernels.pack_triton import pack_triton, unpack_triton

pytestmark = pytest.mark.interpret


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fwht_matches_butterfly(gen, dev, dtype):
    for shape, block in (((3, 5, 384), 128), ((7, 4096), 64), ((1, 24), 8), ((33, 96), 32)):
        x = torch.randn(*shape, generator=gen).to(dtype)
        mask = torch.rand(*shape, generator=gen) > 0.3
        assert torch.equal(fwht_triton(x.to(dev), block).cpu(), fwht_ref(x, block))
        masked = fwht_triton(x.to(dev), block, mask.to(dev)).cpu()
        assert torch.equal(masked, fwht_ref(x * mask, block))
        assert torch.equal(ops.fwht(x.to(dev), block).cpu(), fwht_ref(x, block))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_match_reference(gen, dev, bits):
    for shape in ((37, 24), (5, 1000), (3, 2, 8), (1, 8)):
        codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
        packed = pack_triton(codes.to(dev), bits)
        assert torch.equal(packed.cpu(), pack_ref(codes, bits))
        raw = torch.randint(0, 256, (shape[0], bits * 3), generator=gen, dtype=torch.uint8)
        assert torch.equal(unpack_triton(raw.to(dev), bits).cpu(), unpack_ref(raw, bits))
        assert torch.equal(ops.unpack(ops.pack(codes.to(dev), bits), bits).cpu(), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_matches_grid_values(gen, dev, dtype, bits):
    for rows, n in ((37, 384), (1, 3000), (130, 24)):
        codes = torch.randint(0, 2**bits, (rows, n), generator=gen, dtype=torch.uint8)
        step = torch.rand(rows, 1, generator=gen) + 0.01
        out = dequantize_triton(codes.to(dev), step.to(dev), bits, dtype).cpu()
        assert torch.equal(out, grid_values(codes, step, bits).to(dtype))


def test_small_kernels_reject_bad_input(dev):
    with pytest.raises(ValueError, match="cannot pack 5 codes of 3 bits"):
        pack_triton(torch.zeros(5, dtype=torch.uint8, device=dev), 3)
    with pytest.raises(ValueError, match="whole number of 3-bit codes"):
        unpack_triton(torch.zeros(2, dtype=torch.uint8, device=dev), 3)
    with pytest.raises(ValueError, match="does not divide"):
        fwht_triton(torch.zeros(2, 96, device=dev), 64)
    with pytest.raises(ValueError, match="step"):
        dequantize_triton(torch.zeros(4, 8, dtype=torch.uint8, device=dev), torch.ones(3, 1), 4)
