"""One DeepSpeed launch of the entry/exit tests (run by tests/dist/test_zero_guards.py).

    torchrun --nproc_per_node N tests/dist/zero_guard_worker.py OUT_DIR STEPS

Sequentially, on the tiny Llama of zero_case (W4A4, fp32):
  ZeRO-2 and ZeRO-3, cage_ds.zero.initialize vs deepspeed.initialize + attach by hand:
    STEPS steps each (per-step losses, gathered-weight checks); the hand-attached engine
    then writes save_16bit_model to OUT_DIR/save_<stage>/ with config.json, and rank 0
    records its fp32 latents (the W4A16 reference is built from them by the test);
  allowed: RTN weights under plain deepspeed.initialize with lambda 0 and no "quant" groups
    (cage-train's RTN-STE) train STEPS steps;
  refused (the message is recorded): QuEST under plain ZeRO-2/3 (first forward); CageAdamW's
    step on a flat partition (ZeRO-2, forward guard bypassed to reach the step); attached
    layers switched back to fake-quant; prequantized layers without hooks.
Rank 0 writes OUT_DIR/result.pt.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

from cage_ds.nn import QuantLinear, quantized_modules, set_weight_prequantized
from cage_ds.zero import attach, initialize

sys.path.insert(0, os.path.dirname(__file__))
from zero_case import GLOBAL_BATCH, ds_config, make_batch, make_model_and_optimizer, run_worker
from zero_worker import _train


def _config(stage: int, world: int) -> dict:
    cfg = ds_config(stage, world)
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def _forward_backward_step(engine, rank: int, world: int) -> None:
    ids = make_batch(0)
    per = GLOBAL_BATCH // world
    mine = ids[rank * per : (rank + 1) * per]
    engine.backward(engine(input_ids=mine, labels=mine).loss)
    engine.step()


def _refused(build, run) -> str | None:
    """run(engine) on a fresh engine; the error message, or None if nothing was raised."""
    engine = build()
    try:
        run(engine)
    except (RuntimeError, ValueError) as err:
        return str(err)
    finally:
        engine.destroy()
    return None


def main() -> None:
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    result: dict = {"losses": {}, "gathered": {}, "latents": {}, "errors": {}}

    def plain(stage: int, method: str = "quest", **cage):
        model, opt = make_model_and_optimizer("decoupled", method=method)
        for group in opt.param_groups:
            group.update(cage)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_config(stage, world))
        return engine, opt

    for stage in (2, 3):
        model, opt = make_model_and_optimizer("decoupled")
        engine, *_ = initialize(model=model, optimizer=opt, config=_config(stage, world))
        log: list = []
        result["losses"][f"init_{stage}"] = _train(engine, steps, rank, world, 0, log)
        result["gathered"][f"init_{stage}"] = log
        engine.destroy()

        engine, opt = plain(stage)
        attach(engine, opt)
        log = []
        result["losses"][f"hand_{stage}"] = _train(engine, steps, rank, world, 0, log)
        result["gathered"][f"hand_{stage}"] = log
        save = os.path.join(out_dir, f"save_{stage}")
        assert engine.save_16bit_model(save), "save_16bit_model saved nothing"
        latents = {
            n: safe_get_full_fp32_param(p).detach().clone()
            for n, p in engine.module.named_parameters()
        }
        if rank == 0:
            engine.module.config.save_pretrained(save)
            result["latents"][stage] = latents
        engine.destroy()

    # allowed: cage-train's RTN-STE (no "quant" groups, lambda 0) under plain ZeRO-2
    def rtn(stage: int):
        engine, _ = plain(stage, "rtn", quant=None, cage_lambda=0.0)
        return engine

    engine = rtn(2)
    result["losses"]["rtn_plain_2"] = _train(engine, steps, rank, world, 0, [])
    engine.destroy()

    errors = result["errors"]
    errors["quest_plain_2"] = _refused(
        lambda: plain(2)[0], lambda e: _forward_backward_step(e, rank, world)
    )

    def bypass_guard(engine) -> None:  # what happens at the step without the forward guard
        check, QuantLinear.state_check = QuantLinear.state_check, None
        try:
            _forward_backward_step(engine, rank, world)
        finally:
            QuantLinear.state_check = check

    errors["flat_partition_2"] = _refused(lambda: plain(2)[0], bypass_guard)

    def attached(stage: int):
        engine, opt = plain(stage)
        attach(engine, opt)
        return engine

    def fake_quant_again(engine) -> None:
        next(layer for _, layer in quantized_modules(engine.module)).weight_prequantized = False
        _forward_backward_step(engine, rank, world)

    errors["attached_fake_quant_2"] = _refused(lambda: attached(2), fake_quant_again)

    def prequantized_by_hand(engine) -> None:
        set_weight_prequantized(engine.module, True)
        _forward_backward_step(engine, rank, world)

    errors["prequantized_plain_2"] = _refused(lambda: plain(2)[0], prequantized_by_hand)
    errors["rtn_prequantized_plain_2"] = _refused(lambda: rtn(2), prequantized_by_hand)
    errors["quest_plain_3"] = _refused(
        lambda: plain(3)[0], lambda e: _forward_backward_step(e, rank, world)
    )
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    run_worker(main)
