"""CageTrainer without DeepSpeed (one process): the same training as a hand-written loop over
prepare_model + CageAdamW with the Trainer's linear lr schedule and gradient clipping, bit for
bit (the Trainer's loss is sum / num_items_in_batch, the hand loop's the mean over the same
tokens: the same floats). The linear schedule changes lr every step, so equal losses from
step 2 on also show the Trainer's scheduler drives CageAdamW's lr. And the refusals.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import TrainingArguments, get_linear_schedule_with_warmup

from cage_ds.integrations import CageArgs, CageTrainer
from cage_ds.integrations.hf_trainer import check_deepspeed_config
from cage_ds.optim import CageAdamW

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "dist"))
from hf_trainer_worker import _Recording, _Rows
from zero_case import CLIP, GLOBAL_BATCH, LAMBDA, LR, make_batch, make_model_and_optimizer

STEPS = 3
TELEMETRY = ("quant/rel_error", "quant/masked_frac/weight", "quant/masked_frac/act", "train/lambda")


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=GLOBAL_BATCH,
        max_steps=STEPS,
        learning_rate=LR,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=CLIP,
        lr_scheduler_type="linear",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        use_cpu=True,
        **kw,
    )


def _hand_loop() -> tuple[list[float], dict[str, torch.Tensor]]:
    model, opt = make_model_and_optimizer("decoupled")
    sched = get_linear_schedule_with_warmup(opt, 0, STEPS)
    losses = []
    for k in range(STEPS):
        ids = make_batch(k)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def test_cage_trainer_without_deepspeed_equals_hand_loop(tmp_path):
    model, _ = make_model_and_optimizer("decoupled")
    data = _Rows(torch.cat([make_batch(k) for k in range(STEPS)]))
    cage = CageArgs(lambda_=LAMBDA, silence=0.0, schedule="constant")
    trainer = _Recording(model=model, args=_args(tmp_path), train_dataset=data, cage=cage)
    trainer.losses = []
    trainer.train()
    losses, latents = _hand_loop()
    assert len(trainer.losses) == STEPS and trainer.losses == losses, (trainer.losses, losses)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), latents[n]), f"latent {n} differs from the hand loop"
    client = trainer.cage_optimizer
    assert isinstance(client, CageAdamW)
    assert trainer.optimizer.optimizer is client  # accelerate's AcceleratedOptimizer wraps it
    assert client.state and client.last_lambda == LAMBDA
    assert client.param_groups[0]["total_steps"] == STEPS
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == STEPS
    for entry in logged:
        assert all(k in entry for k in TELEMETRY), entry
        assert entry["train/lambda"] == LAMBDA and 0 < entry["quant/rel_error"] < 1, entry


def test_cage_trainer_refuses_a_client_optimizer(tmp_path):
    model, opt = make_model_and_optimizer("decoupled")
    with pytest.raises(ValueError, match="builds CageAdamW itself"):
        CageTrainer(model=model, args=_args(tmp_path), optimizers=(opt, None))


@pytest.mark.parametrize(
    "config, match",
    [
        (
            {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}},
            "has an 'optimizer' section \\(type 'AdamW'\\)",
        ),
        ({"zero_optimization": {"stage": 0}}, "supports ZeRO stages 1, 2 and 3"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
            "offload_param.device='cpu' is not supported",
        ),
    ],
)
def test_deepspeed_config_refusals(config, match):
    with pytest.raises(ValueError, match=match):
        check_deepspeed_config(config)
    check_deepspeed_config({"train_batch_size": "auto", "zero_optimization": {"stage": 3}})
