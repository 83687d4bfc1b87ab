"""Checkpoints of an FSDP2 CAGE run through torch.distributed.checkpoint (DCP).

The saved state is {"model": fqn -> latent DTensor (fp32, plain local rows), "optim":
torch's get_optimizer_state_dict (fqn-keyed DTensor Adam moments, step, param groups)}.
DCP stores every shard with its global offsets, so a checkpoint saved at N ranks loads at
any M: each rank reads the rows its new shard holds. Loads write the latents in place (the
model's tensors alias the LatentWeight rows), so the next forward gathers q(W H) of the
loaded latents. ``load_latents`` reads the latents alone into an unsharded model in one
process (export).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from .latent import local_rows
from .prepare import reshard


def model_state(model: nn.Module) -> dict[str, Any]:
    """fqn -> the parameter as a DTensor over its plain local rows (aliasing the latent)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = DTensor.from_local(
            local_rows(p.detach()), p.device_mesh, p.placements, run_check=False,
            shape=p.shape, stride=p.stride(),
        )  # fmt: skip
    return out


def state_dict(model: nn.Module, optimizer) -> dict[str, Any]:
    """{"model": model_state(model), "optim": get_optimizer_state_dict(model, optimizer)},
    after resharding the model (an evaluation may have left the root gathered)."""
    reshard(model)
    return {"model": model_state(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save(path: str | os.PathLike, model: nn.Module, optimizer) -> None:
    """Save the latents and optimizer state to directory ``path`` (a collective)."""
    dcp.save(state_dict(model, optimizer), checkpoint_id=path)


def load(path: str | os.PathLike, model: nn.Module, optimizer) -> None:
    """Load a ``save``d checkpoint into a prepared model and its attached optimizer, at any
    world size (a collective)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"cage_ds.fsdp.load: no checkpoint directory {path}")
    sd = state_dict(model, optimizer)
    dcp.load(sd, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, sd["optim"])


@torch.no_grad()
def load_latents(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Write the latents of a ``save``d checkpoint (any world size) into ``model``, a fresh
    unsharded prepare_model'd model of the same architecture, in this process alone (no
    process group needed); returns it, its quantized layers in latent mode."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"cage_ds.fsdp.load_latents: no checkpoint directory {path}")
    state = {"model": {name: p.detach() for name, p in model.named_parameters()}}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return model
