"""FsdpEngine: the part of DeepSpeed's engine cage-train's loop uses, over cage_ds.fsdp.

    model = shard_model(model, on_cuda)      # cage_ds.fsdp.prepare (bf16 params on CUDA)
    engine = FsdpEngine(model, CageAdamW(cage_param_groups(model), ...), scheduler, ...)

One optimizer step is ``accumulation`` rounds of ``engine(...)``, ``backward(loss)``,
``step()``, as under DeepSpeed: backward adds the gradient of loss / accumulation (DeepSpeed's
scaling; FSDP2 averages over ranks, so the step sees the global-batch mean), and the step at
the boundary clips the global norm (cage_ds.fsdp.clip_grad_norm_, which also turns dL/dq
into the latent gradient; grad_clip 0 only measures it), steps the optimizer and the lr
scheduler and zeroes the gradients.

Checkpoints (called by CheckpointManager, which adds its manifest, RNG files and the atomic
commit around them): ``root/tag/`` holds the DCP checkpoint of cage_ds.fsdp.save (latents
and optimizer state, loadable at any world size) and ``cage_client_state.pt`` (rank 0's
client state and the lr scheduler's state; plain data, read with ``weights_only=True``).
The DCP files are read without running pickled code unless checkpoint.trust_pickles.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from cage_ds import fsdp

from .safe_load import refuse_unsafe_pickles

CLIENT_STATE = "cage_client_state.pt"
"""File of a checkpoint's client and lr-scheduler state (module docstring)."""


def shard_model(model: nn.Module, on_cuda: bool) -> nn.Module:
    """cage_ds.fsdp.prepare over all ranks: fp32 on CPU; on CUDA the model moves to this
    rank's GPU and computes in bf16 (fp32 latents, fp32 gradient reduction)."""
    policy = None
    if on_cuda:
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return fsdp.prepare(model, mp_policy=policy)


class FsdpEngine:
    """forward / backward / step / lr / grad norm / checkpoints of a sharded model (module
    docstring); ``module`` and ``optimizer`` as on a DeepSpeed engine."""

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        scheduler,
        *,
        grad_clip: float,
        accumulation: int,
        trust_pickles: bool = False,
    ) -> None:
        self.module = model
        self.optimizer = fsdp.attach(optimizer)
        self.lr_scheduler = scheduler
        self.grad_clip = grad_clip
        self.accumulation = accumulation
        self.trust_pickles = trust_pickles
        self.device = next(model.parameters()).device
        self._micro = 0
        self._grad_norm: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> FsdpEngine:
        self.module.train(mode)
        return self

    def eval(self) -> FsdpEngine:
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        """Count the micro-batch; at the accumulation boundary clip, step, schedule, zero."""
        self._micro += 1
        if self._micro % self.accumulation:
            return
        norm = fsdp.clip_grad_norm_(self.module, self.grad_clip or math.inf)
        self._grad_norm = float(norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping."""
        return self._grad_norm

    def quant_stats(self) -> dict[str, float]:
        """cage_ds.fsdp.quant_stats of the model (collective)."""
        return fsdp.quant_stats(self.module)

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool = False
    ) -> None:
        """Collective: DCP checkpoint + client state under save_dir/tag (module docstring)."""
        path = Path(save_dir) / tag
        fsdp.save(path, self.module, self.optimizer)
        if tdist.get_rank() == 0:
            state = {"client_state": client_state, "lr_scheduler": self.lr_scheduler.state_dict()}
            torch.save(state, path / CLIENT_STATE)

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict[str, Any]]:
        """Collective: load save_dir/tag at this world size; (path, client_state)."""
        path = Path(load_dir) / tag
        with refuse_unsafe_pickles():
            fsdp.load(path, self.module, self.optimizer, trust_pickles=self.trust_pickles)
        state = torch.load(path / CLIENT_STATE, weights_only=True)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return os.fspath(path), state["client_state"]
