"""CageAccelerator under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 on 2 CPU ranks (gloo), with and
without gradient accumulation: the usual accelerate loop trains exactly like
cage_ds.zero.initialize with a hand-written loop (tests/dist/accelerate_worker.py), and stock
accelerate with a CageAdamW fails with the guard's message naming the integration.

Bit for bit: both compute each rank's mean loss over the same rows, DeepSpeed reduces and
steps the same way with the same resolved config and the same CAGE ops (with GA micro
batches per step both hand DeepSpeed the unscaled mean, engine.backward divides by GA, and
the boundary falls on the same micro batches); any difference is a wiring bug.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_zero_cage import _check_gathered, _launch

WORLD, STEPS = 2, 3


@pytest.mark.slow
@pytest.mark.parametrize("stage, ga", [(1, 1), (3, 1), (2, 2)])  # ZeRO-2 runs with GA 2
def test_cage_accelerator_equals_initialize(tmp_path, stage, ga):
    args = (str(STEPS), str(stage), str(ga))
    _launch(WORLD, str(tmp_path), script="accelerate_worker.py", args=args)
    ranks = torch.load(tmp_path / "result.pt", weights_only=False)
    zero = "ZeRO-1/2" if stage < 3 else "ZeRO-3"
    for rank, res in enumerate(ranks):
        where = f"ZeRO-{stage} GA {ga} rank {rank}"
        assert res["world"] == WORLD, f"{where}: accelerate ran {res['world']} process(es)"
        acc, hand = res["losses"], res["hand_losses"]
        assert len(acc) == STEPS * ga and acc == hand, f"{where}: {acc} vs initialize {hand}"
        assert res["optimizer_steps"] == STEPS, f"{where}: {res['optimizer_steps']} steps"
        assert res["attached"] and res["client_is_cage"] and res["last_lambda"] > 0, where
        _check_gathered(res["gathered"], where)
        assert res["telemetry"]["train/lambda"] > 0, res["telemetry"]
        assert 0 < res["telemetry"]["quant/rel_error"] < 1, res["telemetry"]
        stock = res["stock_error"] or ""
        assert f"under DeepSpeed {zero} without the CAGE hooks" in stock, f"{where}: {stock!r}"
        assert "cage_ds.integrations.CageAccelerator" in stock, stock
        assert "prepare the model and its CageAdamW in one call" in (res["alone_error"] or "")
