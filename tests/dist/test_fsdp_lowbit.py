"""FSDP2's low-bit gather equals its values gather bit for bit, in a fraction of the bytes.

One launch per world size (tests/dist/fsdp_worker.py ``lowbit``; N = 3 cuts the
256- and 640-row weights unevenly, the last rank holding fewer rows) trains the tiny Llama
of zero_case.py for 2 CAGE steps twice per case (QuEST W4 fp32, RTN W4 fp32, QuEST W4 with
bf16 params), gathering the quantized weights in values and low-bit. Checked:
- every forward's gathered weights are bit-identical across the two runs (and each equals
  cast(Quantizer.values(full latent)), compare_gathered); losses and final latents equal;
- bytes handed to the all-gathers, per rank: the quantized weights' inputs shrink to
  sum(4 rows_slot (in / G) + ceil(rows_slot in / 8) b) / sum(rows_slot in itemsize), with
  rows_slot = ceil(rows / N), G = in (QuEST) or 128 (RTN's group_size), computed here from
  the shapes: about b / 32 of fp32 and b / 16 of bf16 plus the scales; the other
  parameters' bytes (FSDP2's all-gather inputs, counted at the collective, minus those) are
  unchanged; every rank sends the same.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_fsdp_cage import _launch

WEIGHTS = [(256, 256)] * 4 + [(640, 256)] * 2 + [(256, 640)]  # zero_case's q k v o gate up down
CASES = {"quest": ("quest", 4), "rtn": ("rtn", 4), "quest_bf16": ("quest", 2)}  # (method, itemsize)
RTN_GROUP = 128


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _expected_ratio(world: int, case: str, bits: int = 4) -> float:
    method, itemsize = CASES[case]
    low = values = 0
    for rows, width in WEIGHTS:
        slot = -(-rows // world)
        g = width if method == "quest" else RTN_GROUP
        low += -(-(4 * slot * (width // g) + -(-slot * width // 8) * bits) // 4) * 4
        values += slot * width * itemsize
    return low / values


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_lowbit_gather_equals_values_gather(world, tmp_path):
    _launch(world, tmp_path, "lowbit")
    res = torch.load(tmp_path / "lowbit.pt", weights_only=False)
    for case in CASES:
        values, low = res[case, False], res[case, True]
        where = f"N={world} {case}"
        assert values["lowbit"] == [] and len(low["lowbit"]) == len(WEIGHTS), where
        assert len(low["weights"]) == 2 * len(WEIGHTS), where
        for (n, a), (m, b) in zip(values["weights"], low["weights"], strict=True):
            assert n == m and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), (where, n)
        for rec in values["gathered"] + low["gathered"]:
            assert rec["mismatches"] == 0, (where, rec)
        assert low["losses"] == values["losses"], where
        for n, w in values["latents"].items():
            assert torch.equal(low["latents"][n], w), (where, n)

        (sent_v, total_v), (sent_l, total_l) = values["bytes"][0], low["bytes"][0]
        assert values["bytes"] == [(sent_v, total_v)] * world, where
        assert low["bytes"] == [(sent_l, total_l)] * world, where
        assert sent_l / sent_v == pytest.approx(_expected_ratio(world, case), rel=1e-12), where
        assert total_l - sent_l == total_v - sent_v > 0, f"{where}: other gathers changed"
        assert sent_l / sent_v <= (0.135 if CASES[case][1] == 4 else 0.27), where
