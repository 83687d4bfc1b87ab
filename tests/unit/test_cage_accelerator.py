"""CageAccelerator without DeepSpeed (one process): Accelerator.prepare of the model and its
CageAdamW, the usual accelerate loop, trains with CAGE exactly like the plain loop (same
floats: accelerate adds nothing between the loss and the step on one CPU process)."""

from __future__ import annotations

import os
import sys

from cage_ds.integrations import CageAccelerator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "dist"))
from zero_case import make_batch, make_model_and_optimizer

STEPS = 2


def _plain_loop() -> list[float]:
    model, opt = make_model_and_optimizer("decoupled")
    losses = []
    for k in range(STEPS):
        ids = make_batch(k)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_cage_accelerator_without_deepspeed_trains_with_cage():
    acc = CageAccelerator(cpu=True)
    assert not acc.is_deepspeed
    model, opt = make_model_and_optimizer("decoupled")  # lambda 10 from step 1 (no silence)
    model, prepared = acc.prepare(model, opt)
    losses = []
    for k in range(STEPS):
        ids = make_batch(k)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        prepared.step()
        prepared.zero_grad()
        losses.append(float(loss.detach()))
    assert acc.cage_optimizer is opt and opt.state and opt.last_lambda > 0
    assert losses == _plain_loop(), losses
    stats = acc.cage_telemetry()
    assert stats["train/lambda"] == opt.last_lambda and 0 < stats["quant/rel_error"] < 1, stats
