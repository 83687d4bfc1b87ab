"""ZeRO-1/2's low-bit gather of quantized flat groups equals the stock gather bit for bit.

One launch per world size (testkit.run_ranks of tests/dist/lowbit12_worker.py) trains, per
case (ZeRO-2 bf16 QuEST W4, ZeRO-1 fp32 RTN W4 with clipping, BF16_Optimizer QuEST W4), two
engines from the same seed: stock gather (the low-bit one switched off) and low-bit gather. The tiny
model's quantized flat group has 5888 Hadamard blocks, so at world 3 the partitions cut
rows and RTN groups (zero_case.py).
Checked: the full flat lp buffers of the quantized groups after every step are equal in
every bit, losses and final latents are equal, the other gathers' bytes are unchanged, and
the quantized gathers' bytes equal the formula: per flat group and rank,
round4(4 slots + ceil(P / 8) b) bytes against P itemsize, where P = numel / world and slots
is the largest number of scale groups (QuEST rows, RTN groups) starting in one rank's slot,
counted here from the shapes and offsets DeepSpeed laid out.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from testkit import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 2


def _launch(world: int, out: str, seed: int) -> None:
    run_ranks(world, os.path.join(HERE, "lowbit12_worker.py"), out, str(seed), str(STEPS))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _expected_ratio(layouts: list, spec: dict, world: int, itemsize: int) -> float:
    """Low-bit bytes / stock bytes of one gather of every quantized flat group (the formula)."""
    low = stock = 0
    for shapes, offsets, numel in layouts:
        part = numel // world
        starts = [0] * world
        for (rows, n), off in zip(shapes, offsets, strict=True):
            group = n if spec["method"] == "quest" else spec["group_size"]
            for pos in range(off, off + rows * n, group):
                starts[pos // part] += 1
        low += -(-(4 * max(starts) + -(-part // 8) * spec["bits"]) // 4) * 4
        stock += part * itemsize
    return low / stock


def _cut_groups(layouts: list, spec: dict, world: int) -> int:
    """How many scale groups straddle a partition boundary."""
    out = 0
    for shapes, offsets, numel in layouts:
        part = numel // world
        for (rows, n), off in zip(shapes, offsets, strict=True):
            group = n if spec["method"] == "quest" else spec["group_size"]
            out += sum(pos // part != (pos + group - 1) // part
                       for pos in range(off, off + rows * n, group))  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zero12_lowbit_gather_equals_stock(world, seed, tmp_path):
    out = str(tmp_path / "result.pt")
    _launch(world, out, seed)
    result = torch.load(out, weights_only=False)
    for case, runs in result.items():
        stock, low = runs["stock"], runs["lowbit"]
        kind = "NoneType" if world == 1 else "FlatLowbitGather"
        assert stock["lowbit"] == low["lowbit"] == kind, case
        at_attach = 0 if world == 1 else 1  # attach's update_lp_params, before the switch
        assert (stock["gathers"], low["gathers"]) == (at_attach, at_attach * (1 + STEPS)), case
        for k, (a, b) in enumerate(zip(stock["flats"], low["flats"], strict=True)):
            for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
                assert torch.equal(_bits(fa), _bits(fb)), f"{case}: step {k} flat group {i}"
        assert low["losses"] == stock["losses"], case
        for n, w in stock["latents"].items():
            assert torch.equal(w, low["latents"][n]), f"{case}: latent {n}"
        assert low["bytes"]["other"] == stock["bytes"]["other"], case
        if world == 1:
            continue
        if world == 3:  # the case this world size is here for: scale groups cut by a partition
            assert _cut_groups(low["layouts"], low["spec"], world) > 0, case
        itemsize = stock["flats"][0][0].element_size()
        want = _expected_ratio(low["layouts"], low["spec"], world, itemsize)
        got = low["bytes"]["quantized"] / stock["bytes"]["quantized"]
        assert got == pytest.approx(want, rel=1e-12, abs=0), case
        codes_only = low["spec"]["bits"] / (8 * itemsize)  # scales add < 20% here
        assert codes_only < want < 1.2 * codes_only, case
