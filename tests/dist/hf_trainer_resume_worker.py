"""One launch of the CageTrainer resume test (run by tests/dist/test_hf_trainer.py).

    torchrun --nproc_per_node N tests/dist/hf_trainer_resume_worker.py OUT_DIR STAGE PHASE

On the tiny Llama of zero_case (W4A4, fp32), CageTrainer under a ZeRO-STAGE config trains to
STEPS optimizer steps over the rows of make_batch(0..STEPS-1) in the Trainer's default random
order (seeded by args.seed: the resumed run skips the first SAVE_AT batches of the same
permutation) with a linear lr decay and a linear_ramp lambda schedule (lambda_k differs at
every step after the silence, so a lost step counter or lr schedule shows in the losses):
  PHASE "A": from the start, a checkpoint every SAVE_AT steps (OUT_DIR/A/checkpoint-SAVE_AT);
  PHASE "B": a model of another seed (anything not restored differs) resumes from A's
    checkpoint-SAVE_AT with train(resume_from_checkpoint=...).
Rank 0 writes OUT_DIR/PHASE.pt: per rank the recorded losses, the latents (full fp32),
Adam moments, the CageAdamW's per-parameter step counters, last_lambda, the trainer's
log history and the gathered-weight check of one forward after training. Two launches:
accelerate keeps one DeepSpeed plugin per process.
"""

from __future__ import annotations

import os
import sys

import deepspeed
import torch

from cage_ds.integrations import CageArgs

sys.path.insert(0, os.path.dirname(__file__))
from hf_trainer_worker import _Recording, _Rows, cpu_deepspeed_state, training_args
from zero_case import (
    GLOBAL_BATCH,
    LAMBDA,
    forward_with_checks,
    make_batch,
    make_model_and_optimizer,
    run_worker,
    save_gathered,
)
from zero_worker import _latents, _moments

STEPS, SAVE_AT, SILENCE = 4, 2, 0.25


def main() -> None:
    out_dir, stage, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    cpu_deepspeed_state()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per = GLOBAL_BATCH // world
    model, opt = make_model_and_optimizer("decoupled", seed=1234 if phase == "A" else 99)
    args = training_args(
        os.path.join(out_dir, phase),
        opt,
        STEPS,
        stage,
        1,
        per,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=SAVE_AT,
        train_sampling_strategy="random",
    )
    trainer = _Recording(
        model=model,
        args=args,
        train_dataset=_Rows(torch.cat([make_batch(k) for k in range(STEPS)])),
        cage=CageArgs(lambda_=LAMBDA, silence=SILENCE, schedule="linear_ramp"),
    )
    trainer.losses = []
    resume = os.path.join(out_dir, "A", f"checkpoint-{SAVE_AT}") if phase == "B" else None
    trainer.train(resume_from_checkpoint=resume)
    engine, client = trainer.model_wrapped, trainer.cage_optimizer
    latents = _latents(engine)
    ids = make_batch(STEPS)[rank * per : (rank + 1) * per]
    log = forward_with_checks(engine, latents, ids)
    result = {
        "losses": trainer.losses,
        "latents": latents,
        "moments": _moments(engine),
        "steps": [float(s["step"]) for s in client.state.values() if s],
        "last_lambda": client.last_lambda,
        "log_history": trainer.state.log_history,
        "gathered": log,
    }
    engine.destroy()
    save_gathered(result, os.path.join(out_dir, f"{phase}.pt"))


if __name__ == "__main__":
    run_worker(main)
