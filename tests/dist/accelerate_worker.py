"""One launch of the CageAccelerator tests (run by tests/dist/test_accelerate.py).

    torchrun --nproc_per_node N tests/dist/accelerate_worker.py OUT_DIR STEPS STAGE GA

On the tiny Llama of zero_case (W4A4, fp32, CageAdamW of make_model_and_optimizer):
  1. CageAccelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=STAGE, gradient_clipping=CLIP,
     gradient_accumulation_steps=GA)) on gloo (InitProcessGroupKwargs(backend="gloo"):
     accelerate's supported way to name the backend; without it accelerate finds none on a
     CPU-only torch and runs one process)
     prepares the model, its CageAdamW and a DataLoader over the global micro batches
     make_batch(0..STEPS * GA - 1) (rank r gets rows [r * per, (r + 1) * per) of each, as the
     hand loop) and trains STEPS optimizer steps with the usual accelerate loop (backward
     inside accelerator.accumulate, which marks every GA-th micro batch as DeepSpeed's
     accumulation boundary); then one forward checks the gathered weights against
     Quantizer.values(latent);
  2. cage_ds.zero.initialize with the config accelerate resolved and zero_worker's hand loop
     over the same micro batches (DeepSpeed steps every GA of them);
  3. stock accelerate: a second Accelerator (same state) prepares a fresh model + CageAdamW;
     its first forward must raise the guard's message (result["stock_error"]); and a
     CageAccelerator asked to prepare a model without its CageAdamW refuses
     (result["alone_error"]).
Rank 0 writes OUT_DIR/result.pt.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs

from cage_ds.integrations import CageAccelerator
from cage_ds.zero import attachment, initialize

sys.path.insert(0, os.path.dirname(__file__))
from hf_trainer_worker import _Rows
from zero_case import (
    CLIP,
    GLOBAL_BATCH,
    forward_with_checks,
    make_batch,
    make_model_and_optimizer,
    run_worker,
    save_gathered,
)
from zero_worker import _latents, _train


def _loader(steps: int, per: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _Rows(torch.cat([make_batch(k) for k in range(steps)])), batch_size=per
    )


def main() -> None:
    out_dir, steps, stage, ga = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    plugin = DeepSpeedPlugin(
        zero_stage=stage, gradient_clipping=CLIP, gradient_accumulation_steps=ga
    )
    acc = CageAccelerator(
        deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]
    )
    rank, world = acc.process_index, acc.num_processes
    per = GLOBAL_BATCH // world
    model, opt = make_model_and_optimizer("decoupled")
    engine, _, loader = acc.prepare(model, opt, _loader(steps * ga, per))
    losses = []
    for batch in loader:
        with acc.accumulate(engine):
            loss = engine(**batch).loss
            losses.append(float(loss.detach()))
            acc.backward(loss)
    ids = make_batch(steps * ga)[rank * per : (rank + 1) * per]
    log = forward_with_checks(engine, _latents(engine), ids)
    result = {
        "world": world,
        "losses": losses,
        "optimizer_steps": engine.global_steps,
        "attached": attachment(engine) is not None,
        "client_is_cage": engine.optimizer.optimizer is opt and acc.cage_optimizer is opt,
        "last_lambda": opt.last_lambda,
        "gathered": log,
        "telemetry": acc.cage_telemetry(),
    }
    config = copy.deepcopy(acc.deepspeed_config)
    engine.destroy()

    model, opt = make_model_and_optimizer("decoupled")
    engine, *_ = initialize(model=model, optimizer=opt, config=config)
    hand = []  # this rank's losses
    engine.register_forward_hook(lambda _m, _a, out: hand.append(float(out.loss.detach())))
    _train(engine, steps * ga, rank, world, 0, [])
    result["hand_losses"] = hand
    engine.destroy()

    stock = Accelerator()  # the state keeps the DeepSpeed plugin and gloo
    model, opt = make_model_and_optimizer("decoupled")
    engine, _, loader = stock.prepare(model, opt, _loader(1, per))
    try:
        engine(**next(iter(loader)))
        result["stock_error"] = None
    except RuntimeError as e:
        result["stock_error"] = str(e)
    try:
        CageAccelerator().prepare(make_model_and_optimizer("decoupled")[0])
        result["alone_error"] = None
    except ValueError as e:
        result["alone_error"] = str(e)
    save_gathered(result, os.path.join(out_dir, "result.pt"))


if __name__ == "__main__":
    run_worker(main)
