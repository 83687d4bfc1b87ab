"""CAGE QAT (W4A4) of a tiny Llama with accelerate's DeepSpeed plugin.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 launch/examples/accelerate_cage.py
        [--stage 1|2|3] [--steps 40]

An accelerate QAT script (prepare_model + CageAdamW); the two lines marked "# CAGE" are the
whole change from stock accelerate. Rank 0 prints the last loss and the CAGE telemetry as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs
from tiny import ByteBlocks, tiny_llama
from transformers import get_cosine_schedule_with_warmup

from cage_ds import CageAdamW, QuantConfig, cage_param_groups, prepare_model
from cage_ds.integrations import CageAccelerator  # CAGE (was: from accelerate import Accelerator)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    # on CPU name gloo: accelerate finds no backend for a CPU-only torch (one process)
    gloo = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    plugin = DeepSpeedPlugin(zero_stage=a.stage, gradient_clipping=1.0)
    accelerator = CageAccelerator(deepspeed_plugin=plugin, kwargs_handlers=gloo)  # CAGE
    model = prepare_model(tiny_llama(), QuantConfig.preset("w4a4"))
    opt = CageAdamW(
        cage_param_groups(model, weight_decay=0.1),
        lr=3e-3,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        cage_lambda=10.0,
        cage_silence=0.8,
        total_steps=a.steps,
    )
    sched = get_cosine_schedule_with_warmup(opt, max(1, a.steps // 10), a.steps)
    loader = torch.utils.data.DataLoader(ByteBlocks(), batch_size=4, shuffle=True)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    step, loss = 0, None
    while step < a.steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step == a.steps:
                break
    stats = accelerator.cage_telemetry()  # collective: every rank
    if accelerator.is_main_process:
        print(json.dumps({"step": step, "loss": float(loss), **stats}))
    # release the engine (ZeRO-3's in-flight gathers), then leave the process group: a process
    # that exits with either still alive can abort in interpreter finalization
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main()
