"""Exports from a DeepSpeed ZeRO checkpoint: its latent weights into a model, then the
formats of cage_ds.nn.export (plain Hugging Face, packed codes + scales).

The latent weights live only in the optimizer's fp32 partitions (the module weights DeepSpeed
saves under cage_ds.zero hold quantized values, Q(W) or q(W H), not W), so the export starts
from zero_to_fp32:

    latent W  = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model     = load_latents(checkpoint_dir, fresh prepared model, tag)
    exported  = cage_ds.nn.export.save_plain_hf(model, ...) / save_packed(model, ...)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cage_ds.nn import set_weight_prequantized
from cage_ds.nn.export import save_packed


def latent_state_dict(
    checkpoint_dir: str | Path, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The fp32 latent weights of a DeepSpeed ZeRO checkpoint (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


@torch.no_grad()
def load_latents(checkpoint_dir: str | Path, model: nn.Module, tag: str | None = None) -> nn.Module:
    """Write the checkpoint's latents into ``model`` and return it.

    ``checkpoint_dir``: the folder DeepSpeed saved into (holding one folder per tag);
    ``tag``: None reads ``checkpoint_dir/latest``.

    ``model``: a fresh model of the checkpoint's architecture, prepared with its QuantConfig
    (on CPU, not partitioned); its quantized layers are left in latent mode
    (weight_prequantized=False). ValueError when a parameter is missing or unexpected."""
    latents = latent_state_dict(checkpoint_dir, tag)
    set_weight_prequantized(model, False)
    missing, unexpected = model.load_state_dict(latents, strict=False)
    absent = [k for k in missing if k in dict(model.named_parameters())]
    if absent or unexpected:
        raise ValueError(
            f"load_latents: checkpoint {checkpoint_dir} does not match the model "
            f"(missing parameters {absent[:4]}, unexpected {unexpected[:4]})"
        )
    return model


def export_quantized_checkpoint(
    checkpoint_dir: str | Path, model: nn.Module, out_file: str | Path, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The packed export (cage_ds.nn.export.save_packed) of the checkpoint's latents, loaded
    into ``model`` (see load_latents); returns the tensors written to ``out_file``."""
    return save_packed(load_latents(checkpoint_dir, model, tag), out_file)
