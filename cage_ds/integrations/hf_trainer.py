"""CageTrainer: a transformers.Trainer that trains a prepare_model'd model with CageAdamW,
plain or under DeepSpeed ZeRO-1/2/3 (the drop-in of issue 13).

Invariant: the optimizer that steps the latent weights is the CageAdamW this trainer builds
over cage_param_groups(model); under DeepSpeed it is the engine's client optimizer and the
CAGE hooks (cage_ds.zero.attach) are on the engine before its first forward, so the forward
weights are Q(latent) and the step is the CAGE step (lambda 0: plain QuEST).

Hooks into transformers==5.23.0 (pinned; read from its trainer.py / integrations/deepspeed.py):
  create_optimizer: public override point; under DeepSpeed, deepspeed_init drops any
    optimizer passed to __init__ and calls it, and accelerate hands its result to
    deepspeed.initialize as the client optimizer (a DS "optimizer" section replaces it:
    refused).
  _prepare_for_training(max_steps, ...): gives the step count for the lambda schedule and
    returns the DeepSpeedEngine before the first forward; attach runs there. On resume it
    has loaded the DeepSpeed checkpoint by then (fp32 partitions; CageAdamW state and param
    groups as saved, so the step counters and lambda schedule continue, total_steps
    included); attach writes q(W H) from the loaded masters.
  evaluation_loop: before the first train() under DeepSpeed there is no engine; the stock
    loop would build a ZeRO-3 inference engine without the CAGE hooks (the guard refuses
    it), so CageTrainer evaluates the unpartitioned module on every rank instead.
  log: telemetry is added to the training-step logs (those with "loss"), which every rank
    writes at the same steps (the loss is gathered collectively right before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

from cage_ds.nn import cage_param_groups
from cage_ds.optim import CageAdamW

from ._deepspeed import attach_client, check_deepspeed_config, telemetry


@dataclass(frozen=True)
class CageArgs:
    """CAGE settings of a CageTrainer (CageAdamW's cage_* arguments; lr, betas, eps and
    weight decay come from TrainingArguments, the step count from the Trainer's max steps).

    telemetry: add the quantization telemetry and ``train/lambda`` to every training log.
    """

    lambda_: float = 10.0
    silence: float = 0.8
    schedule: str = "linear_ramp"
    variant: str = "decoupled"
    telemetry: bool = True


class CageTrainer(Trainer):
    """transformers.Trainer whose optimizer is CageAdamW (module docstring for the invariant).

    ``cage``: the CAGE settings (default CageArgs()). Passing ``optimizers`` or
    ``optimizer_cls_and_kwargs`` is refused: this trainer builds the optimizer.
    After training, ``cage_optimizer`` is the CageAdamW that stepped the latent weights.
    """

    def __init__(self, *args: Any, cage: CageArgs | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.optimizer is not None or self.lr_scheduler is not None:
            raise ValueError(
                "CageTrainer builds CageAdamW itself (and the Trainer's scheduler over it); do "
                "not pass optimizers=(...), set the CAGE settings with cage=CageArgs(...)"
            )
        if self.optimizer_cls_and_kwargs is not None:
            raise ValueError("CageTrainer: optimizer_cls_and_kwargs is not supported, use cage=")
        self.cage = cage if cage is not None else CageArgs()
        self.cage_optimizer: CageAdamW | None = None
        self._cage_total_steps: int | None = None
        if self.is_deepspeed_enabled:
            check_deepspeed_config(self.accelerator.state.deepspeed_plugin.hf_ds_config.config)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """CageAdamW over cage_param_groups(model, weight_decay=args.weight_decay)."""
        if self.optimizer is None:
            a = self.args
            self.cage_optimizer = CageAdamW(
                cage_param_groups(self.model if model is None else model, a.weight_decay),
                lr=a.learning_rate,
                betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_epsilon,
                weight_decay=a.weight_decay,
                cage_lambda=self.cage.lambda_,
                cage_silence=self.cage.silence,
                cage_schedule=self.cage.schedule,
                cage_variant=self.cage.variant,
                total_steps=self._cage_total_steps,
            )
            self.optimizer = self.cage_optimizer
        return self.optimizer

    # pinned to transformers==5.23.0: Trainer._prepare_for_training builds the optimizer
    # (via deepspeed_init under DeepSpeed), runs accelerator.prepare and returns the engine
    def _prepare_for_training(self, max_steps: int, *args: Any, **kwargs: Any) -> Any:
        self._cage_total_steps = max_steps
        model, dataloader = super()._prepare_for_training(max_steps, *args, **kwargs)
        if self.is_deepspeed_enabled:
            attach_client(model, self.cage_optimizer, "CageTrainer")
        return model, dataloader

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer.evaluation_loop; before train() under DeepSpeed, on the unpartitioned
        module: the fake-quant forward of the latents, what the first training step computes."""
        if not (self.is_deepspeed_enabled and self.deepspeed is None):
            return super().evaluation_loop(*args, **kwargs)
        if any(hasattr(p, "ds_id") for p in self.model.parameters()):
            raise RuntimeError(
                "CageTrainer: evaluate() before train() of a model already partitioned by ZeRO-3 "
                "(built under zero.Init) is not supported; call train() first"
            )
        self.is_deepspeed_enabled = False  # read by evaluation_loop only: no inference engine
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self.is_deepspeed_enabled = True

    def cage_telemetry(self) -> dict[str, float]:
        """cage-train's keys: quant/* and train/lambda. Collective under DeepSpeed."""
        model = self.model_wrapped if self.is_deepspeed_enabled else self.model
        return telemetry(model, self.cage_optimizer, self.is_deepspeed_enabled)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer.log, with cage_telemetry() in the training-step logs."""
        if self.cage.telemetry and "loss" in logs and self.cage_optimizer is not None:
            logs.update(self.cage_telemetry())
        super().log(logs, start_time)
