"""One launch of the CageTrainer equality test (run by tests/dist/test_hf_trainer.py).

    torchrun --nproc_per_node N tests/dist/hf_trainer_worker.py OUT_DIR STEPS STAGE [GA [eval]]

On the tiny Llama of zero_case (W4A4, fp32, CageAdamW settings of make_model_and_optimizer):
  1. CageTrainer with a DeepSpeed ZeRO-STAGE config of "auto" values and GA (default 1)
     gradient accumulation steps trains STEPS optimizer steps on the global micro batches
     make_batch(0..STEPS * GA - 1) (sequential sampler: rank r gets rows [r * per,
     (r + 1) * per) of each, as the hand loop); compute_loss records the losses; then one
     forward checks the gathered weights against Quantizer.values(latent);
  2. cage_ds.zero.initialize with the config the Trainer resolved, and the hand loop of
     zero_worker._train over the same micro batches (DeepSpeed steps every GA of them).
With "eval", 1. starts with trainer.evaluate() on make_batch(EVAL_BATCH) (before train(): no
engine yet); result["eval_loss"] and result["eval_ref"], the mean over the ranks' rows of the
fake-quant model's loss before training, computed here without DeepSpeed.
Rank 0 writes OUT_DIR/result.pt. One stage per launch: accelerate's state is a process
singleton that keeps the first DeepSpeed plugin.
"""

from __future__ import annotations

import copy
import os
import sys

import deepspeed
import torch
from accelerate import PartialState
from transformers import TrainingArguments

from cage_ds.integrations import CageArgs, CageTrainer
from cage_ds.zero import attachment, initialize

sys.path.insert(0, os.path.dirname(__file__))
from zero_case import (
    CLIP,
    GLOBAL_BATCH,
    LAMBDA,
    LR,
    forward_with_checks,
    make_batch,
    make_model_and_optimizer,
    run_worker,
    save_gathered,
)
from zero_worker import _latents, _train

EVAL_BATCH = 99


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Recording(CageTrainer):
    """Records this rank's loss of every training micro step."""

    losses: list[float]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not return_outputs:  # training; evaluation asks for (loss, outputs)
            self.losses.append(float(loss.detach()))
        return loss


def _ds_config(stage: int) -> dict:
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }


def cpu_deepspeed_state() -> None:
    """accelerate's DeepSpeed state on CPU: TrainingArguments(deepspeed=...) passes no backend
    and accelerate==1.16.0 finds none for a CPU-only torch, so it would run one process
    (num_processes 1). Configure the state with gloo first; the Trainer then uses it
    (accelerator_config use_configured_state)."""
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def training_args(
    out_dir: str, opt: torch.optim.Optimizer, steps: int, stage: int, ga: int, per: int, **kw
) -> TrainingArguments:
    """The Trainer's settings for the hand loop's: optimizer settings of ``opt``'s quantized
    group, ``per`` rows per rank, sequential sampling, ZeRO-``stage`` config of "auto" values;
    ``kw`` overrides (saving is off by default)."""
    group = opt.param_groups[0]  # the quantized weights' group: the settings to match
    settings = dict(
        output_dir=out_dir,
        per_device_train_batch_size=per,
        per_device_eval_batch_size=per,
        max_steps=steps,
        gradient_accumulation_steps=ga,
        learning_rate=LR,
        adam_beta1=group["betas"][0],
        adam_beta2=group["betas"][1],
        adam_epsilon=group["eps"],
        weight_decay=group["weight_decay"],
        max_grad_norm=CLIP,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
        deepspeed=_ds_config(stage),
    )
    return TrainingArguments(**{**settings, **kw})


def main() -> None:
    out_dir, steps, stage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ga = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    evaluate = sys.argv[5:] == ["eval"]
    deepspeed.init_distributed(dist_backend="gloo")
    cpu_deepspeed_state()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per = GLOBAL_BATCH // world
    model, hand_opt = make_model_and_optimizer("decoupled")
    args = training_args(os.path.join(out_dir, "trainer"), hand_opt, steps, stage, ga, per)
    data = _Rows(torch.cat([make_batch(k) for k in range(steps * ga)]))
    cage = CageArgs(lambda_=LAMBDA, silence=0.0, schedule="constant")
    held_out = make_batch(EVAL_BATCH)
    before = copy.deepcopy(model)
    with torch.no_grad():
        ref = [before(input_ids=b, labels=b).loss for b in held_out.split(per)]
    trainer = _Recording(
        model=model, args=args, train_dataset=data, eval_dataset=_Rows(held_out), cage=cage
    )
    trainer.losses = []
    eval_loss = trainer.evaluate()["eval_loss"] if evaluate else None
    trainer.train()
    engine, client = trainer.model_wrapped, trainer.cage_optimizer
    ids = make_batch(steps * ga)[rank * per : (rank + 1) * per]
    log = forward_with_checks(engine, _latents(engine), ids)
    result = {
        "trainer_losses": trainer.losses,
        "attached": attachment(engine) is not None,
        "client_is_cage": engine.optimizer.optimizer is client,
        "client_state": sum(len(s) > 0 for s in client.state.values()),
        "last_lambda": client.last_lambda,
        "gathered": log,
        "log_history": trainer.state.log_history,
        "eval_loss": eval_loss,
        "eval_ref": float(torch.stack(ref).mean()),
    }
    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config)
    engine.destroy()

    model, opt = make_model_and_optimizer("decoupled")
    engine, *_ = initialize(model=model, optimizer=opt, config=config)
    losses = []  # this rank's losses, as the Trainer records them
    engine.register_forward_hook(lambda _m, _a, out: losses.append(float(out.loss.detach())))
    _train(engine, steps * ga, rank, world, 0, [])
    result["hand_losses"] = losses
    engine.destroy()
    save_gathered(result, os.path.join(out_dir, "result.pt"))


if __name__ == "__main__":
    run_worker(main)
