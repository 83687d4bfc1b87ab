"""WireFormat.flat: the low-bit payload of a ZeRO-1/2 flat group of several parameters.

One process plays every rank: each encodes the codes of its slot of the flat (parameters
back to back at their offsets, padding at the end) and the scales it owns; decoding the
stacked payloads must give cast(Quantizer.values(W_j)) at every parameter's offset and 0 on
padding, bit for bit, at world 1-5 (cuts inside rows and RTN groups)."""

from __future__ import annotations

import pytest
import torch

from cage_ds.quant import Quantizer, QuantSpec
from cage_ds.quant.lowbit import WireFormat, decode, encode

SHAPES = [(3, 384), (2, 256), (4, 128)]
SPECS = [
    QuantSpec(bits=4, hadamard_block=128, mask="trust"),
    QuantSpec(bits=3, hadamard_block=128, mask="clip"),
    QuantSpec(method="rtn", bits=4, group_size=64),
]


def _layout(world: int) -> tuple[list[int], int]:
    offsets = [0]
    for r, n in SHAPES[:-1]:
        offsets.append(offsets[-1] + r * n)
    end = offsets[-1] + SHAPES[-1][0] * SHAPES[-1][1] + 5  # some padding
    return offsets, -(-end // world) * world


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}{s.bits}")
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_flat_payloads_decode_to_the_values(spec, world, gen):
    offsets, numel = _layout(world)
    fmt = WireFormat.flat(spec, SHAPES, offsets, numel, world)
    quantizer = Quantizer(spec)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    qs = [quantizer.quantize(w) for w in weights]
    want = torch.zeros(numel, dtype=torch.bfloat16)
    for w, off in zip(weights, offsets, strict=True):
        want[off : off + w.numel()] = quantizer.values(w).to(torch.bfloat16).reshape(-1)
    payloads = []
    for rank in range(world):
        codes, scales = [], []
        for j, a, b, g in fmt.pieces(rank):
            codes.append(qs[j].codes.reshape(-1)[a:b])
            scales.append(qs[j].scales.reshape(-1)[-(-a // g) : -(-b // g)])
        payloads.append(encode(fmt, rank, torch.cat(codes), torch.cat(scales)))
    got = decode(fmt, torch.stack(payloads), torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    if world == 3:  # this case exists for scale groups (rows, RTN groups) a cut divides
        part = fmt.ps
        starts = [(p, g) for o, n, g in fmt.parts for p in range(o, o + n, g)]
        assert any(p // part != (p + g - 1) // part for p, g in starts)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_flat_scale_group_has_one_owner(world):
    offsets, numel = _layout(world)
    fmt = WireFormat.flat(SPECS[0], SHAPES, offsets, numel, world)
    owned = [g for r in range(world) for g in range(*fmt.owned(r))]
    assert owned == list(range(sum(r for r, _ in SHAPES)))
    assert fmt.nbytes == -(-(4 * fmt.slots + -(-(numel // world) // 8) * 4) // 4) * 4


def test_flat_refuses_an_uneven_cut():
    with pytest.raises(ValueError, match="not an even cut"):
        WireFormat.flat(SPECS[0], SHAPES[:1], [0], 3 * 384 + 1, 2)
