"""CageAccelerator: an accelerate.Accelerator whose prepare() trains a prepare_model'd model
with its CageAdamW as CAGE QAT, under a DeepSpeed plugin (ZeRO-1/2/3) or without one (the
drop-in of issue 13). The user's script changes two lines:

    from cage_ds.integrations import CageAccelerator   # was: from accelerate import Accelerator
    accelerator = CageAccelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3, ...))

Invariant: under DeepSpeed, prepare(model, cage_adamw, ...) returns an engine whose ZeRO
wrapper steps that CageAdamW with cage_ds.zero's hooks attached before any forward, so the
forward weights are Q(latent) and training equals cage_ds.zero.initialize with the config
accelerate resolved. Without DeepSpeed prepare is Accelerator.prepare: the CageAdamW steps the
full 2-D weights (one process or DDP) and the layers fake-quantize.

Hooks into accelerate==1.16.0 (pinned; read from its accelerator.py): prepare() under
DeepSpeed calls deepspeed.initialize(model=, optimizer=<the client>, config_params=) in
_prepare_deepspeed and returns the DeepSpeedEngine in the model's position.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ._deepspeed import attach_client, check_deepspeed_config, is_cage_client, telemetry


class CageAccelerator(Accelerator):
    """accelerate.Accelerator that puts the CAGE hooks on the DeepSpeed engine it prepares
    (module docstring for the invariant). Takes Accelerator's arguments.

    After prepare, ``cage_optimizer`` is the CageAdamW that steps the latent weights and
    ``cage_model`` the prepared model (the engine under DeepSpeed).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cage_optimizer: torch.optim.Optimizer | None = None
        self.cage_model: torch.nn.Module | None = None
        if self.is_deepspeed:
            check_deepspeed_config(self.state.deepspeed_plugin.deepspeed_config, "CageAccelerator")

    @property
    def is_deepspeed(self) -> bool:
        return self.distributed_type == DistributedType.DEEPSPEED

    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        """Accelerator.prepare; under DeepSpeed a model must come with its CageAdamW in the
        same call, and the returned engine has the CAGE hooks attached."""
        models = [i for i, a in enumerate(args) if isinstance(a, torch.nn.Module)]
        clients = [a for a in args if is_cage_client(a)]
        if self.is_deepspeed and (models or clients) and (len(models), len(clients)) != (1, 1):
            others = [type(a).__name__ for a in args if isinstance(a, torch.optim.Optimizer)]
            raise ValueError(
                "CageAccelerator under DeepSpeed: prepare the model and its CageAdamW in one "
                f"call, prepare(model, CageAdamW(cage_param_groups(model, ...)), ...); got "
                f"{len(models)} model(s) and optimizers {others or 'none'}"
            )
        out = super().prepare(*args, device_placement=device_placement)
        result = out if isinstance(out, tuple) else (out,)
        if clients:
            self.cage_optimizer = clients[0]
        if models:
            self.cage_model = result[models[0]]
        if self.is_deepspeed and models:
            attach_client(self.cage_model, self.cage_optimizer, "CageAccelerator")
        return out

    def cage_telemetry(self) -> dict[str, float]:
        """cage-train's keys: quant/* and train/lambda. Collective under DeepSpeed."""
        if self.cage_optimizer is None or self.cage_model is None:
            raise RuntimeError("CageAccelerator.cage_telemetry: prepare model and CageAdamW first")
        model = self.cage_model if self.is_deepspeed else self.unwrap_model(self.cage_model)
        return telemetry(model, self.cage_optimizer, self.is_deepspeed)
