"""Checkpoints of an FSDP2 CAGE run through torch.distributed.checkpoint (DCP).

The saved state is {"model": fqn -> latent DTensor (fp32, plain local rows), "optim":
torch's get_optimizer_state_dict (fqn-keyed DTensor Adam moments, step, param groups)}.
DCP stores every shard with its global offsets, so a checkpoint saved at N ranks loads at
any M: each rank reads the rows its new shard holds. Loads write the latents in place (the
model's tensors alias the LatentWeight rows), so the next forward gathers q(W H) of the
loaded latents. ``load_latents`` reads the latents alone into an unsharded model in one
process (export).

Safe loading (``trust_pickles=False``, the default): DCP unpickles its ``.metadata`` file and
non-tensor values with full pickle; here the metadata goes through an unpickler that admits
only DCP's metadata classes and torch's Size/dtype/layout, and the values through
``torch.load(weights_only=True)``. A file needing anything else raises
pickle.UnpicklingError naming the global.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
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


_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch.Size / dtypes / layouts and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (
            dtype
            or module == "torch.distributed.checkpoint.metadata"
            or ((module, name) in _METADATA_GLOBALS)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load DCP metadata: its pickle calls {module}.{name} (code, not "
            "checkpoint metadata)"
        )


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata goes through _MetadataUnpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor values with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _dcp_load(state: dict[str, Any], path, trust_pickles: bool, **kw: Any) -> None:
    if trust_pickles:
        dcp.load(state, checkpoint_id=path, **kw)
    else:
        with open(os.path.join(path, ".metadata"), "rb") as fh:  # one-line refusal first
            try:
                _MetadataUnpickler(fh).load()
            except pickle.UnpicklingError as err:
                raise pickle.UnpicklingError(f"{fh.name}: {err}") from None
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner(), **kw)


def load(
    path: str | os.PathLike, model: nn.Module, optimizer, *, trust_pickles: bool = False
) -> None:
    """Load a ``save``d checkpoint into a prepared model and its attached optimizer, at any
    world size (a collective); safe unpickling unless ``trust_pickles`` (module docstring)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"cage_ds.fsdp.load: no checkpoint directory {path}")
    sd = state_dict(model, optimizer)
    _dcp_load(sd, path, trust_pickles)
    set_optimizer_state_dict(model, optimizer, sd["optim"])


@torch.no_grad()
def load_latents(
    path: str | os.PathLike, model: nn.Module, *, trust_pickles: bool = False
) -> nn.Module:
    """Write the latents of a ``save``d checkpoint (any world size) into ``model``, a fresh
    unsharded prepare_model'd model of the same architecture, in this process alone (no
    process group needed); returns it, its quantized layers in latent mode."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"cage_ds.fsdp.load_latents: no checkpoint directory {path}")
    state = {"model": {name: p.detach() for name, p in model.named_parameters()}}
    _dcp_load(state, path, trust_pickles, no_dist=True)
    return model
